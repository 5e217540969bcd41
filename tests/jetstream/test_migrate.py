"""`charter migrate`: a SQLite installation's log moves onto NATS, its registry and ledger onto PostgreSQL
without losing an event; the daemon then continues the same chain there."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from charter.budget.ledger import Ledger
from charter.bus.log.nats import NatsLog
from charter.bus.log.sqlite import verify_file
from charter.sdk import Agent
from charter.server.daemon import stop
from conftest import aclose, make_home, require_ci_service, start_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
psycopg = pytest.importorskip("psycopg")
PG = "host=127.0.0.1 port=5432 dbname=test"


def migrate(home: Path) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "charter", "--home", str(home), "migrate", "--json"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


async def test_migrate_sqlite_to_nats_and_postgres(tmp_path: Path, shared_nats: str) -> None:
    require_ci_service("PostgreSQL", "127.0.0.1", 5432)
    schema, stream = "t_" + uuid.uuid4().hex[:16], "T" + uuid.uuid4().hex[:20].upper()
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    home = make_home(tmp_path / "home")
    d = start_daemon(home)
    try:
        alpha = await d.enroll("alpha", "worker")
        for i in range(30):
            await alpha.publish("agents.alpha.n", {"i": i, "pad": "x" * (i * 500)})
        got = []
        async for ev in alpha.subscribe("agents.alpha.n", consumer="work"):
            got.append(ev.seq)
            if len(got) == 5:
                break
        await alpha.ack("work", got[-1])
        held = await alpha.reserve(usd=0.2)
        spent = await alpha.reserve(usd=0.1)
        await alpha.settle(spent["reservation_id"], usd=0.05)
        await aclose(alpha)
    finally:
        stop(home)
    ledger = Ledger(home.budget_db_path)  # a gateway call in flight when the daemon died: still to be booked in full
    booked = ledger.reserve(agent_id="agt_x", role="worker", usd=7, tokens=3, limits=[], on_expiry="book")
    ledger.close()
    before = verify_file(home.db_path)
    assert before.ok

    text = home.config_path.read_text().replace(
        "[bus]\n", f'[bus]\nbackend = "nats"\nnats_url = "{shared_nats}"\nstream = "{stream}"\n', 1)
    home.config_path.write_text(text + f'\n[store]\nbackend = "postgres"\npostgres_dsn = "{PG} '
                                       f'options=-csearch_path={schema}"\n')
    try:
        code, doc = migrate(home.root)
        assert code == 0, doc
        assert doc["ok"] and doc["log"]["copied"] == before.checked and doc["log"]["already_there"] == 0
        assert (doc["log"]["head_seq"], doc["log"]["head_hash"]) == (before.head_seq, before.head_hash)
        assert doc["log"]["consumers"] == 1 and doc["log"]["breaks"] == []
        assert doc["store"]["tables"]["reservations"] == 3 and doc["store"]["spend"] == [50_000, 1]
        with psycopg.connect(f"{PG} options=-csearch_path={schema}") as c:
            kinds = dict(c.execute("SELECT id, on_expiry FROM reservations").fetchall())
        assert kinds[booked.id] == "book" and sorted(kinds.values()) == ["book", "release", "release"]
        assert doc["store"]["tables"]["agents"] == 1 and doc["store"]["agents"] == [1, 1]
        assert doc["store"]["tables"]["invites"] == 1 and doc["store"]["tables"]["api_keys"] == 1

        code, again = migrate(home.root)  # run twice: the log is already there; the store is refused
        assert code != 0

        d = start_daemon(home)  # now on NATS and PostgreSQL
        alpha = Agent.load(home.root.parent / "alpha.creds.json")
        try:
            r = await alpha.publish("agents.alpha.after", {"n": 1})
            assert r["seq"] > before.head_seq
            rest = []
            async for ev in alpha.subscribe("agents.alpha.n", consumer="work"):
                rest.append(ev.seq)
                break
            assert rest[0] == got[-1] + 1  # the consumer's position came along
            (usd,) = [lim for lim in (await alpha.budget())["limits"] if lim["unit"] == "usd"]
            assert (usd["reserved"], usd["committed"]) == (200_000, 50_000)  # the ledger came along (and the registry: alpha is known)
            await alpha.settle(held["reservation_id"], usd=0.01)  # a reservation made before the move
        finally:
            await alpha.close()
            stop(home)
        log = await NatsLog(shared_nats, stream).open()
        try:
            report = await log.verify()
            assert report.ok and report.head_seq > before.head_seq
            entries = await log.read(0, before.head_seq)
            assert [e.hash.hex() for e in entries][-1] == before.head_hash
        finally:
            await log.close()
    finally:
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")
        log = NatsLog(shared_nats, stream)
        await log.delete_storage()
        await log.close()

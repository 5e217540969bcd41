"""Retention: archived, mirrored, old entries leave charter.db, and everything still verifies."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from charter.archive.archivist import Archivist
from charter.archive.query import Query, events
from charter.archive.verify import verify_archive
from charter.bus.envelope import seal
from charter.bus.log.sqlite import SqliteLog, verify_file
from charter.config import Home
from charter.identity.keys import SigningKey

from .conftest import ARCHIVED, LIVE_HEAD, archive_of, configure, emit_n, mirrors_toml, new_home, root_key
from .test_proofs import cli

LATER = int(time.time() * 1000) + 400 * 86400_000  # "now", a long time after every entry was written


def run(home: Home, work: Any) -> Any:
    async def go() -> Any:
        a = Archivist.local(home)
        try:
            return await work(a)
        finally:
            await a.close()

    return asyncio.run(go())


def check(home: Home, signatures: bool = True):
    return verify_archive(archive_of(home).root, db_path=home.db_path, root=root_key(home).public,
                          signatures=signatures)


def test_nothing_is_pruned_without_retention_or_a_mirror(built: Home) -> None:
    assert run(built, lambda a: a.prune(LATER))["reason"].startswith("hot_retention is 0")
    configure(built, hot_retention="30d")
    assert "no mirror is configured" in run(built, lambda a: a.prune(LATER))["reason"]
    configure(built, prune_unmirrored=True)
    assert run(built, lambda a: a.prune())["pruned"] == 0  # nothing is 30 days old yet


def test_pruned_database_still_verifies_and_reads(built: Home) -> None:
    configure(built, hot_retention="30d", prune_unmirrored=True)
    result = run(built, lambda a: a.prune(LATER))
    assert result == {"pruned": ARCHIVED, "horizon_seq": ARCHIVED}

    report = verify_file(built.db_path, root=root_key(built).public)
    assert report.ok, report.breaks
    assert (report.horizon_seq, report.checked, report.head_seq) == (ARCHIVED, LIVE_HEAD - ARCHIVED + 1, LIVE_HEAD + 1)
    done = cli(built, "log", "verify", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"horizon_seq": 42' in done.stdout
    full = check(built)
    assert full.ok and full.horizon_seq == ARCHIVED, full.to_dict()

    async def reads() -> None:
        log = SqliteLog(built.db_path)
        try:
            seq, _ = await log.head()
            assert seq == LIVE_HEAD + 1  # the pruned event
            assert [e.seq for e in await log.read(0, 3)] == [43, 44, 45]
            assert await log.get(10) is None
            key = root_key(built)
            (receipt,) = await log.append([seal(key, sender="operator", subject="charter.test.after", payload={})])
            assert receipt.seq == LIVE_HEAD + 2
        finally:
            await log.close()

    asyncio.run(reads())
    assert verify_file(built.db_path, root=root_key(built).public).ok
    seqs = [e["seq"] for e in events(archive_of(built).root, built.db_path)]
    assert seqs == list(range(1, LIVE_HEAD + 3))  # archived and live, once each
    assert {e["source"] for e in events(archive_of(built).root, built.db_path, Query(until_seq=40))} == {"archive"}

    # More entries, sealed again, pruned again: the horizon moves on.
    def more(a: Archivist) -> Any:
        async def go() -> Any:
            await emit_n(a, 15, 200)
            await a.seal()
            return await a.prune(LATER)
        return go()

    again = run(built, more)
    assert again["pruned"] > 0 and again["horizon_seq"] > ARCHIVED
    assert check(built).ok
    assert verify_file(built.db_path, root=root_key(built).public).ok


def _sql(home: Home, sql: str, *args: Any) -> None:
    db = sqlite3.connect(home.db_path, isolation_level=None)
    try:
        db.execute(sql, args)
    finally:
        db.close()


def test_a_large_prune_is_cut_into_short_transactions(built: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each transaction deletes at most `retention.BATCH` entries (the daemon's appends wait for its
    write lock); batch by batch, the horizon, its running total and the chain come out as in one."""
    import charter.archive.archivist as archivist_module
    import charter.archive.retention as retention

    monkeypatch.setattr(retention, "BATCH", 10)
    deletes: list[int] = []
    real = archivist_module.prune

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        assert kwargs.get("batch") in (None, 10)
        r = real(*args, **kwargs)
        deletes.append(r["pruned"])
        return r

    monkeypatch.setattr(archivist_module, "prune", counting)
    configure(built, hot_retention="30d", prune_unmirrored=True)
    assert run(built, lambda a: a.prune(LATER)) == {"pruned": ARCHIVED, "horizon_seq": ARCHIVED}
    assert deletes == [10, 10, 10, 10, ARCHIVED - 40, 0]
    db = sqlite3.connect(built.db_path)
    assert db.execute("SELECT seq, pruned FROM log_horizon").fetchone() == (ARCHIVED, ARCHIVED)
    db.close()
    report = check(built)
    assert report.ok and report.horizon_seq == ARCHIVED, report.to_dict()


def test_tampering_across_the_retention_boundary(built: Home) -> None:
    configure(built, hot_retention="30d", prune_unmirrored=True)
    run(built, lambda a: a.prune(LATER))
    _sql(built, "UPDATE log_horizon SET hash = ? WHERE id = 1", b"\x01" * 32)
    assert check(built).first_bad == ARCHIVED
    assert verify_file(built.db_path).first_bad == ARCHIVED + 1


def test_a_horizon_moved_past_the_archive(built: Home) -> None:
    configure(built, hot_retention="30d", prune_unmirrored=True)
    run(built, lambda a: a.prune(LATER))
    db = sqlite3.connect(built.db_path, isolation_level=None)
    h = db.execute("SELECT hash FROM log WHERE seq = 45").fetchone()[0]
    db.execute("UPDATE log_horizon SET seq = 45, hash = ? WHERE id = 1", (h,))
    db.execute("DELETE FROM log WHERE seq <= 45")
    db.close()
    assert verify_file(built.db_path).ok  # the database alone cannot tell
    report = check(built)
    assert report.first_bad == ARCHIVED + 1, report.to_dict()


def test_pruning_stops_at_what_every_mirror_verified(built: Home, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    configure(built, hot_retention="1d", mirrors=mirrors_toml([mirror]))
    assert "has no verified copy yet" in run(built, lambda a: a.prune(LATER))["reason"]

    def sync_seal_prune(a: Archivist) -> Any:
        async def go() -> Any:
            await a.sync()
            await emit_n(a, 15, 300)
            await a.seal()  # archived past what the mirror holds
            return await a.prune(LATER)
        return go()

    result = run(built, sync_seal_prune)
    assert result["horizon_seq"] == ARCHIVED  # the mirror verified 42 entries; the rest waits for a sync
    assert check(built).ok


def test_signatures_still_check_after_the_enrolment_was_pruned(tmp_path: Path) -> None:
    """An agent enrolled before the cut keeps publishing after it: `charter log verify` still knows its key."""
    home = new_home(tmp_path / "home", hot_retention="1d", prune_unmirrored=True)
    agent = SigningKey.generate()
    agent_id = "agt_01JTESTAGENT0000000000000A"

    def scenario(a: Archivist) -> Any:
        async def go() -> Any:
            await a.emit("charter.agents.enrolled", {"agent_id": agent_id, "public_key": agent.public.b64,
                                                     "name": "alpha"})
            for i in range(12):
                await a.log.append([seal(agent, sender=agent_id, subject="agents.alpha.events", payload={"i": i})])
            await a.seal()
            pruned = await a.prune(LATER)
            for i in range(3):
                await a.log.append([seal(agent, sender=agent_id, subject="agents.alpha.events", payload={"j": i})])
            return pruned
        return go()

    pruned = run(home, scenario)
    assert pruned["pruned"] > 10
    report = verify_file(home.db_path, root=root_key(home).public)
    assert report.ok, report.breaks
    assert check(home).ok
    # A forged entry from that agent after the cut is still caught.
    async def forge() -> None:
        log = SqliteLog(home.db_path)
        await log.append([seal(SigningKey.generate(), sender=agent_id, subject="agents.alpha.events", payload={})])
        await log.close()

    asyncio.run(forge())
    bad = verify_file(home.db_path, root=root_key(home).public)
    assert not bad.ok and "signature does not verify" in bad.breaks[0].reason

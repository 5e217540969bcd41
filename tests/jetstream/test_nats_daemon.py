"""A real daemon (`charter up`) whose log is the NATS JetStream stream: `[bus] backend = "nats"`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.bus.log.nats import NatsLog
from charter.config import Home
from charter.sdk import Agent
from charter.server.daemon import stop
from conftest import Daemon, aclose, make_home, start_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def nats_home(root: Path, url: str, stream: str) -> Home:
    home = make_home(root)
    text = home.config_path.read_text()
    home.config_path.write_text(text.replace(
        "[bus]\n", f'[bus]\nbackend = "nats"\nnats_url = "{url}"\nstream = "{stream}"\n', 1))
    return home


@pytest.fixture
def nats_daemon(tmp_path: Path, shared_nats: str) -> Iterator[Daemon]:
    stream = "T" + uuid.uuid4().hex[:20].upper()
    home = nats_home(tmp_path / "home", shared_nats, stream)
    d = start_daemon(home)
    d.stream = stream  # type: ignore[attr-defined]
    yield d
    stop(home)

    async def cleanup() -> None:
        log = NatsLog(shared_nats, stream)
        await log.delete_storage()
        await log.close()

    asyncio.run(cleanup())


def cli_verify(home: Home) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "charter", "--home", str(home.root), "log", "verify", "--json"],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


async def test_daemon_on_nats_publishes_delivers_and_verifies(nats_daemon: Daemon, shared_nats: str) -> None:
    d = nats_daemon
    alpha = await d.enroll("alpha", "worker")
    owl = await d.enroll("owl", "observer")
    try:
        status = await d.admin("GET", "/v1/admin/status")
        assert status["log"]["backend"] == "nats"
        received = []

        async def watch(first: int) -> None:
            async for ev in owl.subscribe("agents.>", from_seq=first):
                received.append(ev)
                if len(received) == 3:
                    return

        # From the next entry on, not "from now": a subscription opened after the publish still sees it.
        head = (await d.admin("GET", "/v1/health"))["head_seq"]
        watcher = asyncio.create_task(watch(head + 1))
        r1 = await alpha.publish("agents.alpha.status", {"state": "ready"})
        many = await alpha.publish_many([("agents.alpha.status", {"n": 1}), ("agents.alpha.status", {"n": 2})])
        await asyncio.wait_for(watcher, 10)
        assert [e.seq for e in received] == [r1["seq"], many[0]["seq"], many[1]["seq"]]

        # Durable consumers keep their position in the JetStream key-value bucket.
        seqs = [(await alpha.publish("agents.alpha.jobs", {"n": i}))["seq"] for i in range(3)]
        got = []
        async for ev in alpha.subscribe("agents.alpha.jobs", consumer="jobs"):
            got.append(ev.seq)
            if len(got) == 2:
                break
        await alpha.ack("jobs", got[-1])
        rest = []
        async for ev in alpha.subscribe("agents.alpha.jobs", consumer="jobs"):
            rest.append(ev.seq)
            break
        assert got + rest == seqs

        # The same envelope again is a replay, refused before the log.
        env = alpha.seal("agents.alpha.once", {"n": 1})
        await alpha.publish_envelope(env)
        with pytest.raises(Exception) as info:
            await alpha.publish_envelope(env)
        assert "replay" in str(info.value)
    finally:
        await aclose(alpha, owl)

    # The stream, read back from the server by a separate process, verifies (chain and signatures).
    code, doc = cli_verify(d.home)
    assert code == 0, doc
    assert doc["ok"] and doc["checked"] == doc["head_seq"] > 8

    # After a restart the daemon continues the same chain, and an envelope from before the restart
    # is still a replay (nonces rebuilt from the stream, ids checked against the whole stream).
    stop(d.home)
    start_daemon(d.home)
    again = Agent.load(d.home.root.parent / "alpha.creds.json")
    try:
        with pytest.raises(Exception) as info:
            await again.publish_envelope(env)
        assert "replay" in str(info.value)
        r = await again.publish("agents.alpha.after", {"n": 1})
        assert r["seq"] > doc["head_seq"]
    finally:
        await again.close()
    code, doc = cli_verify(d.home)
    assert code == 0 and doc["ok"]


async def test_capsules_and_log_query_read_the_stream(nats_daemon: Daemon) -> None:
    """Capsules, `charter log query` and `archive export` read the live log wherever it is: on NATS,
    the JetStream stream (there is no log in charter.db to fall back on)."""
    d = nats_daemon
    alpha = await d.enroll("alpha", "worker")
    try:
        sent = await alpha.publish("agents.alpha.status", {"state": "on-nats-5e1d"})
        mine = await alpha.capsule()
        assert "on-nats-5e1d" in mine["markdown"]
        assert mine["meta"]["seq_from"] <= sent["seq"] <= mine["meta"]["seq_to"]
        built = await d.admin("POST", "/v1/admin/capsules/build", json={"name": "AI_ALIGNMENT"})
        assert "alpha" in built["markdown"] and built["meta"]["seq_to"] >= sent["seq"]
    finally:
        await alpha.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "charter", "--home", str(d.home.root), *args],
                              capture_output=True, text=True, timeout=60)

    found = cli("log", "query", "--subject", "agents.alpha.>", "--sender", "alpha", "--json")
    assert found.returncode == 0, found.stderr
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert [(r["seq"], r["source"]) for r in rows] == [(sent["seq"], "live")]
    assert rows[0]["envelope"]["payload"] == {"state": "on-nats-5e1d"}
    assert cli("log", "query", "--text", "ON-NATS-5E1D", "--json").stdout.count("\n") == 1
    exported = cli("archive", "export", "--jsonl", "--to-seq", str(sent["seq"]))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, sent["seq"] + 1))

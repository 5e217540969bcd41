"""The archivist inside the daemon: it seals by count and by time, checkpoints, mirrors and prunes on
its own schedule; its state reaches reflection; the operator API and the CLI drive it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from charter.archive.verify import verify_archive
from charter.bus.log.sqlite import verify_file
from charter.node import Node
from charter.server.daemon import stop
from tests.conftest import make_home, start_daemon

from .conftest import configure, mirrors_toml, root_key
from .test_proofs import charter, cli

pytestmark = pytest.mark.anyio


async def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_node_runs_the_archivist_on_its_schedule(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    mirror = tmp_path / "mirror"
    configure(home, segment_entries=5, seal_interval="300ms", checkpoint_interval="200ms",
              mirrors=mirrors_toml([mirror]), sync_interval="1h", hot_retention="1ms")
    node = Node(home)
    await node.start()
    try:
        for i in range(12):
            await node.emit("charter.test.entry", {"n": i})
        # By count: full segments of 5 at once; by time: the rest within the seal interval.
        await wait_for(lambda: node.archivist.state()["archived_seq"] >= 14)
        await wait_for(lambda: (mirror / "MANIFEST.json").exists())
        state = await node.state_providers["archive"]()
        assert state["segments"] >= 3 and state["checkpoints"] >= 1 and state["mirrors"] == [str(mirror)]
        # Retention ran after the sync: charter.db starts after what the mirror verified.
        await wait_for(lambda: verify_file(home.db_path).horizon_seq > 0)
        report = await node.archivist.verify(signatures=True)
        assert report.ok, report.to_dict()
        assert verify_archive(mirror, root=node.root_key.public).ok
        subjects = [e.subject for e in await node.log.read(0, 1000)]
        assert "charter.archive.checkpoints" in subjects and "charter.archive.synced" in subjects
        assert "charter.archive.pruned" in subjects
        from charter.reflect.engine import reflect

        result = await reflect(node)
        assert "archive-verifies" not in {c["truth"] for c in result["contradictions"]}
    finally:
        await node.close()
    assert verify_file(home.db_path, root=root_key(home).public).ok


async def test_node_checkpoints_the_live_head_between_seals(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    configure(home, segment_entries=1000, seal_interval="1h", checkpoint_interval="100ms")
    # The capsule builder's own events would be new entries to checkpoint: keep it out of this one.
    home.config_path.write_text(home.config_path.read_text() + "\n[capsules]\nenabled = false\n")
    node = Node(home)
    await node.start()
    try:
        await node.archivist.seal()  # a first checkpoint
        first = node.archivist.state()["checkpoints"]
        for i in range(3):
            await node.emit("charter.test.entry", {"n": i})
        await wait_for(lambda: node.archivist.state()["checkpoints"] > first)
        head = (await node.log.head())[0]
        await asyncio.sleep(0.5)  # its own checkpoint event does not call for another
        assert node.archivist.state()["checkpoints"] == first + 1
        assert (await node.log.head())[0] == head
    finally:
        await node.close()


async def test_a_broken_live_chain_is_refused_and_reported(tmp_path: Path) -> None:
    import sqlite3

    from charter.reflect.engine import reflect

    home = make_home(tmp_path / "home")
    configure(home, enabled=False)
    node = Node(home)  # a first run writes the entries; nothing is sealed yet
    await node.start()
    try:
        for i in range(5):
            await node.emit("charter.test.entry", {"n": i})
    finally:
        await node.close()
    # Behind the daemon's back, before sealing. Its own start-up events may come first, so the entry
    # is found by its content, not by an assumed seq.
    db = sqlite3.connect(home.db_path, isolation_level=None)
    [(seq, raw)] = [(s, bytes(r)) for s, r in db.execute("SELECT seq, raw FROM log") if b'"n":1' in bytes(r)]
    db.execute("UPDATE log SET raw = ? WHERE seq = ?", (raw.replace(b'"n":1', b'"n":7'), seq))
    db.close()
    configure(home, enabled=True, seal_interval="300ms", checkpoint_interval="1h")
    node = Node(home)  # the archivist of the next run must refuse to seal it and say where it broke
    await node.start()
    try:
        await wait_for(lambda: node.archivist.state()["verified"] is False)
        state = node.archivist.state()
        assert state["archived_seq"] == 0 and state["first_bad_seq"] == seq, state
        assert f"broken at seq {seq}" in state["last_error"]
        result = await reflect(node)
        [c] = [c for c in result["contradictions"] if c["truth"] == "archive-verifies"]
        assert str(seq) in str(c["evidence"])
    finally:
        await node.close()


def test_operator_api_and_cli_through_the_daemon(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    configure(home, seal_interval="1h")
    daemon = start_daemon(home)
    try:
        async def api() -> dict:
            await daemon.admin("POST", "/v1/admin/archive/seal", json={})
            status = await daemon.admin("GET", "/v1/admin/archive/status")
            proof = await daemon.admin("GET", "/v1/admin/archive/proofs/1")
            found = await daemon.admin("GET", "/v1/admin/archive/events", params={"subject": "charter.daemon.>"})
            verified = await daemon.admin("POST", "/v1/admin/archive/verify", json={"signatures": True})
            return {"status": status, "proof": proof, "found": found, "verified": verified}

        got = asyncio.run(api())
        assert got["status"]["archived_seq"] >= 1 and got["status"]["checkpoints"] >= 1
        assert got["proof"]["entry"]["seq"] == 1 and got["proof"]["type"] == "charter.inclusion_proof"
        assert [e["envelope"]["subject"] for e in got["found"]["events"]] == ["charter.daemon.started"]
        assert got["verified"]["ok"] is True

        sealed = charter(home, "archive", "seal", "--json")  # through the daemon
        assert sealed.returncode == 0, sealed.stderr
        assert sealed.stdout and json.loads(sealed.stdout)["checkpoint"]["number"] >= 2
        ok = cli(home, "archive", "verify")
        assert ok.returncode == 0 and "ok" in ok.stdout, ok.stdout + ok.stderr
        queried = cli(home, "log", "query", "--subject", "charter.archive.>", "--json")
        lines = [json.loads(x) for x in queried.stdout.splitlines()]
        assert {x["envelope"]["subject"] for x in lines} >= {"charter.archive.identity", "charter.archive.checkpoints"}
    finally:
        stop(home)
    status = cli(home, "archive", "status")
    assert status.returncode == 0 and "checkpoint" in status.stdout


def test_log_query_filters_span_the_archive_and_the_live_log(tmp_path: Path) -> None:
    """--sender (by name), --text, --since/--until and --first/--limit, on events of which the
    older half is sealed in the archive and the newer half only in charter.db."""
    home = make_home(tmp_path / "home")
    configure(home, seal_interval="1h")
    daemon = start_daemon(home)
    try:
        async def traffic() -> dict:
            alpha, bravo = await daemon.enroll("alpha", "worker"), await daemon.enroll("bravo", "worker")
            old = [await alpha.publish("agents.alpha.notes", {"n": i, "note": f"old-{i}"}) for i in range(3)]
            await bravo.publish("agents.bravo.notes", {"note": "Needle in bravo's old hay"})
            await daemon.admin("POST", "/v1/admin/archive/seal", json={})
            await asyncio.sleep(0.05)
            split = int(time.time() * 1000)
            await asyncio.sleep(0.05)
            new = [await alpha.publish("agents.alpha.notes", {"n": i, "note": f"new-{i}"}) for i in range(3)]
            await bravo.publish("agents.bravo.notes", {"note": "a NEEDLE in bravo's new hay"})
            await alpha.close()
            await bravo.close()
            return {"old": [r["seq"] for r in old], "new": [r["seq"] for r in new], "split": split}

        seqs = asyncio.run(traffic())
    finally:
        stop(home)

    def query(*args: str) -> list[dict]:
        done = cli(home, "log", "query", *args, "--json")
        assert done.returncode == 0, done.stderr
        return [json.loads(x) for x in done.stdout.splitlines()]

    alpha = query("--sender", "alpha", "--subject", "agents.>")
    assert [(e["seq"], e["source"]) for e in alpha] == \
        [(s, "archive") for s in seqs["old"]] + [(s, "live") for s in seqs["new"]]
    needles = query("--text", "needle")  # case-insensitive, both sides
    assert [e["envelope"]["payload"]["note"] for e in needles] == ["Needle in bravo's old hay", "a NEEDLE in bravo's new hay"]
    assert [e["source"] for e in needles] == ["archive", "live"]
    before = query("--sender", "alpha", "--until", str(seqs["split"]))
    assert [e["seq"] for e in before] == seqs["old"]
    after = query("--sender", "alpha", "--since", str(seqs["split"]), "--subject", "agents.alpha.notes")
    assert [e["seq"] for e in after] == seqs["new"]
    assert [e["seq"] for e in query("--sender", "alpha", "--subject", "agents.>", "--limit", "2")] == seqs["new"][-2:]
    assert [e["seq"] for e in query("--sender", "alpha", "--subject", "agents.>", "--limit", "2", "--first")] == seqs["old"][:2]
    assert query("--sender", "nobody-by-that-name") == []
    text = cli(home, "log", "query", "--sender", "bravo")
    assert text.returncode == 0 and text.stdout.count("agents.bravo.notes") == 2 and "bravo" in text.stdout


def test_cli_exit_codes_without_a_daemon(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    assert cli(home, "archive", "verify").returncode == 0  # nothing archived yet: nothing wrong
    assert cli(home, "archive", "seal").returncode == 0  # runs here when no daemon does
    assert cli(home, "archive", "verify").returncode == 0
    assert cli(home, "archive", "export").returncode == 2  # a format is required
    exported = cli(home, "archive", "export", "--jsonl")
    lines = [json.loads(x) for x in exported.stdout.splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1)) and lines[0]["source"] == "archive"
    bad = cli(home, "log", "query", "--since", "yesterday-ish")
    assert bad.returncode == 2
    seg = next((home.root / "archive" / "segments").glob("*.seg.zst"))
    seg.write_bytes(b"not zstd")
    broken = cli(home, "archive", "verify", "--json")
    assert broken.returncode == 5
    assert json.loads(broken.stdout)["first_bad_seq"] == 1
    assert cli(home, "archive", "seal").returncode == 0  # sealing reads the live log, not old segments
    assert cli(home, "archive", "verify").returncode == 5
    missing = cli(home, "archive", "verify", "--path", str(tmp_path / "nowhere"))
    assert missing.returncode == 1


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    configure(home, segment_entries=0)
    done = cli(home, "archive", "seal")
    assert done.returncode == 1 and "archive.segment_entries" in done.stderr
    configure(home, segment_entries=10, seal_interval="soon")
    assert "archive.seal_interval" in cli(home, "archive", "seal").stderr
    configure(home, seal_interval="1h", mirrors='["/tmp/a", "/tmp/a"]')
    assert "archive.mirrors" in cli(home, "archive", "seal").stderr




def test_demo_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import charter.archive.demo_step as demo_step

    def in_process(home, args):  # the demo's commands without a process start each (a thread: no loop)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(cli, home, *args).result()
        return done.returncode, done.stdout, done.stderr

    monkeypatch.setattr(demo_step, "_execute", in_process)

    from rich.console import Console

    from charter.archive.archivist import Archivist
    from charter.archive.demo_step import demo_archive

    home = make_home(tmp_path / "home")

    async def go() -> None:
        a = Archivist.local(home)
        try:
            await a.emit("charter.daemon.started", {"pid": 1})
            await a.emit("agents.alpha.results", {"task": 1, "answer": 42})
        finally:
            await a.close()
        await demo_archive(home, Console(file=buf, width=110))

    buf = io.StringIO()
    asyncio.run(go())
    text = buf.getvalue()
    assert "caught" in text and "first bad seq 2" in text, text

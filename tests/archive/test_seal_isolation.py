"""The daemon's archivist seals in a child process: reading and hashing a segment is pure Python,
and in a thread of the daemon it held the GIL against the event loop (and so against every model
call and publish) for as long as it ran."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from charter.archive.archivist import Archivist
from charter.archive.layout import Layout
from charter.archive.segments import archive_head
from charter.archive.verify import verify_archive
from charter.bus.envelope import seal
from charter.config import Home
from charter.identity.registry import OPERATOR_ID
from tests.conftest import make_home

from .conftest import configure, root_key
from .test_daemon import wait_for

pytestmark = pytest.mark.anyio

ENTRIES = 12000
SEGMENT = 4000


async def fill(home_root: Path) -> None:
    a = Archivist.local(Home(home_root))
    try:
        key = root_key(a.home)
        for start in range(0, ENTRIES, 500):
            envs = [seal(key, sender=OPERATOR_ID, subject="charter.test.entry",
                         payload={"n": i, "note": f"entry number {i}", "pad": "x" * 200})
                    for i in range(start, start + 500)]
            await a.log.append(envs)
    finally:
        await a.close()


async def sealed_with(home_root: Path, *, isolated: bool) -> tuple[dict, float]:
    a = Archivist.local(Home(home_root))
    a.isolated = isolated
    try:
        cpu = time.process_time()  # every thread of this process; a child's time is not counted
        result = await a.seal(partial=False)
        return result, time.process_time() - cpu
    finally:
        await a.close()


async def test_a_child_seals_the_same_segments_without_the_daemons_cpu(tmp_path: Path) -> None:
    home = make_home(tmp_path / "a")
    configure(home, segment_entries=SEGMENT)
    await fill(home.root)
    twin = tmp_path / "b"
    shutil.copytree(home.root, twin)

    in_thread, thread_cpu = await sealed_with(home.root, isolated=False)
    in_child, child_cpu = await sealed_with(twin, isolated=True)

    # The same segments, entry for entry: one sealing code path, whichever process runs it.
    assert [s["count"] for s in in_child["sealed"]] == [SEGMENT] * (ENTRIES // SEGMENT)
    assert [(s["first_seq"], s["last_seq"], s["root"]) for s in in_child["sealed"]] == \
        [(s["first_seq"], s["last_seq"], s["root"]) for s in in_thread["sealed"]]
    assert archive_head(Layout(twin / "archive"))[0] == ENTRIES
    report = verify_archive(twin / "archive", db_path=twin / "charter.db")
    assert report.ok, report.sorted_breaks()[:3]
    # ...and the calling process did not spend the sealing's CPU itself.
    assert child_cpu < thread_cpu / 2, (child_cpu, thread_cpu)


async def test_the_daemon_seals_and_syncs_in_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running node's archivist sends its seals and its syncs to a child process, on its schedule
    and when the operator asks; the CLI's (`Archivist.local`, above) keeps them in this process."""
    import charter.archive.archivist as archivist_module
    from charter.node import Node

    real = archivist_module.run_in_child
    ran: list[str] = []

    async def recording(job):  # type: ignore[no-untyped-def]
        ran.append(getattr(getattr(job, "func", job), "__name__", "?"))
        return await real(job)

    monkeypatch.setattr(archivist_module, "run_in_child", recording)
    home = make_home(tmp_path / "home")
    mirror = tmp_path / "mirror"
    configure(home, segment_entries=5, seal_interval="300ms", checkpoint_interval="1h",
              mirrors=f'["{mirror}"]', sync_interval="1h", verify_interval="1h")
    node = Node(home)
    await node.start()
    try:
        for i in range(6):
            await node.emit("charter.test.entry", {"n": i})
        await wait_for(lambda: {"seal_waiting", "sync_mirror"} <= set(ran), timeout=30)
        ran.clear()
        await node.emit("charter.test.entry", {"n": 6})
        result = await node.archivist.seal(partial=True)  # what the API's POST /v1/admin/archive/seal runs
        assert "seal_waiting" in ran and result["archived_seq"] >= 7
        assert (await node.archivist.verify()).ok and "verify_archive" in ran
    finally:
        await node.close()

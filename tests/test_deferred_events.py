"""Events nobody waits for (`Node.emit_soon`): written together a moment later, never lost on a clean
shutdown, and a failure to write them is told to the operator, not raised into a request. And the
log's background checkpoints, which must not hold up the requests either."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from charter.bus.envelope import Envelope
from charter.bus.log.sqlite import SqliteLog
from charter.encoding import loads
from charter.node import Node
from tests.conftest import make_home

pytestmark = pytest.mark.anyio


async def _events(node: Node, subject: str) -> list[dict]:
    return [loads(e.raw)["payload"] for e in await node.log.read(0, 10_000) if e.subject == subject]


async def test_events_queued_together_are_written_in_one_transaction(tmp_path: Path) -> None:
    node = Node(make_home(tmp_path / "home"))
    batches: list[int] = []
    write = node._write_sealed

    async def counting(envelopes: Sequence[Envelope]) -> list[str | None]:
        batches.append(len(envelopes))
        return await write(envelopes)

    node.deferred._write = counting
    try:
        for i in range(40):
            node.emit_soon("charter.test.soon", {"i": i})
        assert await _events(node, "charter.test.soon") == []  # queued, not yet written
        await asyncio.sleep(0.05)
        assert [p["i"] for p in await _events(node, "charter.test.soon")] == list(range(40))  # in order
        assert batches == [40]
        assert node.deferred.written == 40 and node.deferred.lost == 0
    finally:
        await node.close()


async def test_a_clean_shutdown_writes_what_is_queued(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    node = Node(home)
    for i in range(5):
        node.emit_soon("charter.test.soon", {"i": i})
    await node.close()  # at once: the delay has not passed
    log = SqliteLog(home.db_path)
    try:
        written = [loads(e.raw)["payload"]["i"] for e in await log.read(0, 1000) if e.subject == "charter.test.soon"]
        assert written == [0, 1, 2, 3, 4]
        report = await log.verify()
        assert report.ok and report.checked == 5, report
    finally:
        await log.close()


async def test_a_failed_write_is_logged_with_each_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = Node(make_home(tmp_path / "home"))
    try:
        node.emit_soon("charter.test.soon", {"name": "alpha", "i": 1})
        node.emit_soon("not a subject!", {"name": "beta"})  # refused by the gate: named, the other is kept
        with caplog.at_level(logging.ERROR, logger="charter.bus"):
            await node.deferred.drain()
        assert [p["i"] for p in await _events(node, "charter.test.soon")] == [1]
        refused = [r for r in caplog.records if "could not be written" in r.getMessage()]
        assert len(refused) == 1 and "not a subject!" in refused[0].getMessage() and "beta" in refused[0].getMessage()
        assert node.deferred.lost == 1

        # The database goes away under the log: both events are reported lost, nothing is raised.
        node.log._db.close()
        caplog.clear()
        node.emit_soon("charter.test.soon", {"name": "gamma", "i": 2})
        node.emit_soon("charter.test.soon", {"name": "delta", "i": 3})
        with caplog.at_level(logging.ERROR, logger="charter.bus"):
            await node.deferred.drain()
        lost = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
        assert len(lost) == 2 and "gamma" in lost[0] and "delta" in lost[1]
        assert all("closed database" in m for m in lost)
        assert node.deferred.lost == 3
    finally:
        node.log._db = __import__("charter.db", fromlist=["connect"]).connect(node.home.db_path)
        await node.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling policies are Linux's")
async def test_the_log_checkpoints_only_when_the_core_is_idle(tmp_path: Path) -> None:
    """The WAL's checkpoints run on a SCHED_IDLE thread: on a core shared with the event loop they
    use what the requests leave, and the loop's own thread keeps its policy."""
    log = SqliteLog(tmp_path / "charter.db")
    node = Node(make_home(tmp_path / "home"))
    try:
        await log.append([node._seal_event("charter.test.soon", {"i": 0})])  # starts the checkpointer
        threads = {t.name: t.native_id for t in threading.enumerate()}
        tid = threads["charter-log-checkpoint"]
        deadline = time.monotonic() + 5
        while os.sched_getscheduler(tid) != os.SCHED_IDLE and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the thread sets it first thing, once it runs
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        assert os.sched_getscheduler(threading.get_native_id()) == os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        await log.close()
        await node.close()


async def test_a_kick_writes_what_is_queued_and_a_read_of_the_log_sees_it(tmp_path: Path) -> None:
    """Queued events wait for a `kick` (a model call's request has gone to its backend) or their
    delay; a read of the log through the daemon writes them first, so it never misses them."""
    node = Node(make_home(tmp_path / "home"))
    node.deferred.delay = 60.0
    try:
        node.emit_soon("charter.test.soon", {"i": 0})
        await asyncio.sleep(0.02)
        assert await _events(node, "charter.test.soon") == []
        node.deferred.kick()
        await asyncio.sleep(0.02)
        assert [p["i"] for p in await _events(node, "charter.test.soon")] == [0]
        node.emit_soon("charter.test.soon", {"i": 1})
        read = await node.read_recent(node.operator, "charter.test.soon", 10)  # at once: no kick, no delay
        assert [loads(e.raw)["payload"]["i"] for e in read] == [0, 1]
    finally:
        await node.close()

"""Large reads of the SQLite log run on its reader thread, so the event loop keeps serving meanwhile.

The archivist reads a segment's entries and a capsule build scans up to 20,000 entries for a few
operator events; done on the loop, every request that arrived in between waited for them. These
tests check the mechanism without timing anything: a read that the loop runs inline completes in
the task's first step, one handed to the reader thread cannot (its result comes back through the
loop a turn later). And what the reader thread returns is exactly what the log holds, including
what was appended just before the read was asked for.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from charter.bus.envelope import seal
from charter.bus.log.scan import read_matching
from charter.bus.log.sqlite import INLINE_ROWS, SqliteLog
from charter.identity.keys import SigningKey

pytestmark = pytest.mark.anyio

KEY = SigningKey.generate()


async def filled(path: Path, n: int, *, rare_every: int = 0) -> SqliteLog:
    """A log of `n` operator entries on `charter.models.calls`, with a `charter.agents.enrolled`
    every `rare_every` entries (0: none)."""
    log = SqliteLog(path)
    batch = []
    for i in range(1, n + 1):
        subject = "charter.agents.enrolled" if rare_every and i % rare_every == 0 else "charter.models.calls"
        batch.append(seal(KEY, sender="operator", subject=subject, payload={"i": i}))
        if len(batch) == 500:
            await log.append(batch)
            batch = []
    if batch:
        await log.append(batch)
    return log


async def first_step_finishes(coro: object) -> tuple[bool, object]:
    """Run `coro` as a task; say whether it had finished when the loop first came back to us."""
    task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the task's first step runs before we resume
    done = task.done()
    return done, await task


async def test_a_small_read_runs_inline_and_a_large_one_on_the_reader_thread(tmp_path: Path) -> None:
    log = await filled(tmp_path / "log.db", 300)
    try:
        inline, small = await first_step_finishes(log.read(0, INLINE_ROWS))
        assert inline and [e.seq for e in small] == list(range(1, INLINE_ROWS + 1))  # type: ignore[attr-defined]
        off_loop, large = await first_step_finishes(log.read(10, 250))
        assert not off_loop  # the loop ran us while the reader thread worked
        assert large == log.read_sync(10, 250)  # the same entries, field for field
        assert [e.seq for e in large] == list(range(11, 261))  # type: ignore[attr-defined]
        # what there is to read decides, not what is asked for: a follower asking for 500 after
        # each append finds a few, and reads them inline
        inline, tail = await first_step_finishes(log.read(290, 500))
        assert inline and [e.seq for e in tail] == list(range(291, 301))  # type: ignore[attr-defined]
    finally:
        await log.close()


async def test_the_reader_thread_sees_what_was_appended_just_before(tmp_path: Path) -> None:
    log = await filled(tmp_path / "log.db", 100)
    try:
        assert len(await log.read(0, 1000)) == 100  # the reader's connection is open now
        await log.append([seal(KEY, sender="operator", subject="charter.models.calls", payload={"late": True})])
        entries = await log.read(0, 1000)
        assert len(entries) == 101 and entries[-1].seq == 101
        assert entries[-1].hash == log.head_sync()[1]
    finally:
        await log.close()


async def test_a_scan_for_rare_subjects_runs_off_the_loop_and_finds_each_one(tmp_path: Path) -> None:
    log = await filled(tmp_path / "log.db", 5000, rare_every=997)
    try:
        head = log.head_sync()[0]
        off_loop, found = await first_step_finishes(
            read_matching(log, ("charter.agents.>",), after=0, upto=head, limit=25, newest_first=True,
                          sender="operator"))
        assert not off_loop
        assert [e.seq for e in found] == [4985, 3988, 2991, 1994, 997]  # type: ignore[attr-defined]
        assert all(e.subject == "charter.agents.enrolled" for e in found)  # type: ignore[attr-defined]
        oldest_first = await read_matching(log, ("charter.agents.>",), after=1000, upto=head, limit=2,
                                           sender="operator")
        assert [e.seq for e in oldest_first] == [1994, 2991]
    finally:
        await log.close()


async def test_a_sender_that_is_not_an_id_is_refused_before_any_sql(tmp_path: Path) -> None:
    log = await filled(tmp_path / "log.db", 10)
    try:
        with pytest.raises(ValueError, match="not a sender id"):
            await read_matching(log, ("charter.>",), after=0, upto=10, sender="operator' OR '1'='1")
    finally:
        await log.close()


async def test_closing_the_log_closes_its_reader_and_later_reads_fail(tmp_path: Path) -> None:
    log = await filled(tmp_path / "log.db", 200)
    await log.read(0, 200)
    reader = log._reader
    assert reader is not None
    await log.close()
    assert log._reader is None and reader._db is None  # the reader's connection was closed in its thread
    for limit in (10, 200):  # inline or not, as a closed connection says; no new reader is opened
        with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
            await log.read(0, limit)
    assert log._reader is None


async def test_the_reader_opens_a_path_with_uri_characters(tmp_path: Path) -> None:
    """The reader's connection is read-only, opened by URI: '#', '?' and '%' in the path are escaped."""
    log = await filled(tmp_path / "odd #1 ?x %41" / "log.db", 200)
    try:
        assert [e.seq for e in await log.read(0, 200)] == list(range(1, 201))
    finally:
        await log.close()

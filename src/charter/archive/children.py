"""Child processes for the archivist's long Python work: seals, mirror syncs, verifications.

Each job runs in a process of its own that exits when the job is done, niced (`CHILD_NICE`) so
that it loses a shared core to the daemon. A process of its own, because reading and hashing a
segment is pure Python: in a thread of the daemon it held the GIL against the event loop for as
long as it ran.

The children are forked from a fork server that has imported the archive's modules once
(`PRELOAD`), started when the daemon starts (`warm`). Spawned afresh for each job, as before, a
child spent 0.2-0.3 s of CPU starting Python and importing them, on the daemon's core when the
two share one (see `warm` for why it was at the daemon's priority); and the spawn blocked the
event loop for 3-12 ms, waiting for the new process and for the executor's thread to start. At 16
model calls in flight with a budget, each seal's spawn held up 30-40 answers by 30-60 ms (the
daemon pinned to one core, as benchmarks/gateway.py runs it). The loop now hands the job to a
worker thread, which waits for the fork server instead (`run_in_child`). Where there is no fork
server (not POSIX), children are spawned.

Why not one long-lived worker: a fresh process per job gives its memory back when it is done,
and a job that crashes its process takes nothing else with it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import TypeVar

T = TypeVar("T")

CHILD_NICE = 10  # a seal, sync or verification in the background yields the CPU to the daemon
# What every job's child would otherwise import. "__main__": the script the daemon runs as, when it
# is one (the `charter` console script), not `python -m charter`; a child imports it again (its
# `if __name__ == "__main__"` keeps it from running), which takes the whole CLI with it.
PRELOAD = ["__main__", "charter.archive.archivist"]

_warm_lock = threading.Lock()
_warmed = False  # (should the server die, the next job's start starts another, at the caller's priority)


def _lower_priority() -> None:
    """Nice 10, not SCHED_IDLE: a child starved under SCHED_IDLE on a busy machine would hold what
    it holds (the archive's lock, a mirror's lock, a read of charter.db) for as long as it waits,
    and an operator's `charter archive seal` or `verify` would wait behind it. (Measured beside
    the gateway at c=16 with a budget, against nice 10: added p99 x0.53 in one run, x1.31 in the
    next; no gain that shows through the noise.)"""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < CHILD_NICE:  # (a child of the fork server is niced already)
            os.setpriority(os.PRIO_PROCESS, 0, CHILD_NICE)
    except OSError:
        pass


def context() -> BaseContext:
    """The fork server's context where there is one, else spawn (never a plain fork: the daemon
    has threads, and a fork of it could inherit a lock some other thread held)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def warm() -> None:
    """Start the fork server now, if it is not running. It blocks for the server's start (~0.25 s
    of its CPU), so call it from a thread, early: the first job need not wait for it.

    On Linux it is started from a thread of its own at `CHILD_NICE` (a thread's nice value is its
    own, and a process it starts inherits it), so that the server and every child forked from it
    are niced from their first instruction. Spawned from a thread at the daemon's priority, a
    child started Python and imported what it needed at that priority, for 0.2-0.3 s, before its
    own `_lower_priority` ran: on a core shared with the event loop, that was when answers waited.
    """
    global _warmed
    if _warmed or context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _warm_lock:
        if not _warmed:
            _start_niced(forkserver.ensure_running)
            _warmed = True


def _start_niced(ensure_running: Callable[[], None]) -> None:
    failed: list[BaseException] = []

    def start() -> None:
        if sys.platform == "linux":
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHILD_NICE)
            except OSError:
                pass
        try:
            ensure_running()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=start, name="charter-forkserver-start", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


async def run_in_child(job: Callable[[], T]) -> T:
    """`job()` in a child process, niced; its result comes back pickled."""

    def submit() -> tuple[ProcessPoolExecutor, Future[T]]:
        warm()  # (at once, unless this is the first job and nobody warmed the server)
        pool = ProcessPoolExecutor(max_workers=1, mp_context=context(), initializer=_lower_priority)
        try:
            return pool, pool.submit(job)
        except BaseException:
            pool.shutdown(wait=False)
            raise

    submitting = asyncio.get_running_loop().run_in_executor(None, submit)
    try:
        pool, done = await asyncio.shield(submitting)
    except asyncio.CancelledError:  # the pool is made all the same: let it go once it is
        submitting.add_done_callback(_shut_down)
        raise
    try:
        return await asyncio.wrap_future(done)
    finally:
        pool.shutdown(wait=False)


def _shut_down(submitted: asyncio.Future[tuple[ProcessPoolExecutor, Future[T]]]) -> None:
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result()[0].shutdown(wait=False)

"""Child processes for the archivist's long Python work: seals, mirror syncs, verifications.

Each job runs in a process of its own that exits when the job is done, niced (`CHILD_NICE`) so
that it loses a shared core to the daemon. A process of its own, because reading and hashing a
segment is pure Python: in a thread of the daemon it held the GIL against the event loop for as
long as it ran.

The children are forked from a fork server that has imported the archive's modules once (`PRELOAD`),
started when the daemon starts (`warm`) at the children's priority. Spawned afresh for each job, as
before, a child spent 0.2-0.3 s of CPU starting Python and importing them, on the daemon's core when
the two share one (see `warm` for why it was at the daemon's priority); and the spawn blocked the
event loop for 3-12 ms, waiting for the new process and for the executor's thread to start. At 16
model calls in flight with a budget, each seal's spawn held up 30-40 answers by 30-60 ms (the daemon
pinned to one core, as benchmarks/gateway.py runs it). The loop now hands the job to a worker
thread, which waits for the fork server instead (`run_in_child`). Where there is no fork server (not
POSIX), children are spawned.

A child whose daemon is gone (killed mid-seal, say) exits at once (`_watch_daemon`): nobody will
read what it makes, and, holding the fork server's pipe, it would also keep the server alive.
What a killed seal leaves is an unfinished segment, which the next seal replaces.

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
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext
from typing import TypeVar

T = TypeVar("T")

CHILD_NICE = 10  # how much lower than the daemon a seal, sync or verification runs
# What every job's child would otherwise import: the archive, and the CLI (see `_preload`: when the
# daemon is the `charter` console script rather than `python -m charter`, each child runs that
# script again as `__mp_main__`, which imports the CLI: 0.2 s of CPU, unless the server has it).
# ("__main__" itself would be the natural entry, but Python before 3.13.8 never hands the
# script's path to the fork server.)
PRELOAD = ["charter.archive._preload"]

_warm_lock = threading.Lock()


def _child_nice() -> int:
    """The daemon's nice value plus `CHILD_NICE` (19 at most): relative, as `nice` is, so that a
    daemon started niced still outranks its children, and a root daemon's children are never
    raised above it."""
    return min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + CHILD_NICE)


def _child_start(nice: int) -> None:
    """Each child's first step (the pool's initializer): its priority, and its watch on the daemon.

    Nice, not SCHED_IDLE: a child starved under SCHED_IDLE on a busy machine would hold what it
    holds (the archive's lock, a mirror's lock, a read of charter.db) for as long as it waits, and
    an operator's `charter archive seal` or `verify` would wait behind it. (Measured beside the
    gateway at c=16 with a budget, against nice 10: added p99 x0.53 in one run, x1.31 in the next;
    no gain that shows through the noise.)"""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:  # (a child of a warmed fork server is niced already)
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass
    daemon = multiprocessing.parent_process()
    if daemon is not None:
        threading.Thread(target=_watch_daemon, args=(daemon.sentinel,), name="charter-watch-daemon",
                         daemon=True).start()


def _watch_daemon(sentinel: int) -> None:
    """Exit once the daemon has (see the module's doc). The sentinel is the end of a pipe whose
    other end only the daemon holds (multiprocessing's own): it reads as closed exactly when the
    daemon is gone, however it went, with no pid to be reused meanwhile."""
    wait([sentinel])
    os._exit(1)


def context() -> BaseContext:
    """The fork server's context where there is one, else spawn (never a plain fork: the daemon
    has threads, and a fork of it could inherit a lock some other thread held)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def warm() -> None:
    """Start the fork server, unless it is running. Blocking (for a fork and an exec; the server
    then imports `PRELOAD` on its own, ~0.25 s of its CPU, and the first job waits for that in its
    worker thread), so call it from a thread; the daemon's archivist does when it starts, and
    every job's start does, in case the server died meanwhile.

    On Linux it is started from a thread of its own at the children's priority (a thread's nice
    value is its own, and a process it starts inherits it), so that the server and every child
    forked from it are niced from their first instruction. Spawned from a thread at the daemon's
    priority, a child started Python and imported what it needed at that priority, 0.2-0.3 s of
    CPU, before its own initializer niced it: on a core shared with the event loop, that was when
    answers waited. Elsewhere (macOS) the children are niced by their initializer only.
    """
    if context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _warm_lock:
        _start_niced(forkserver.ensure_running)


def _start_niced(ensure_running: Callable[[], None]) -> None:
    """`ensure_running()` from a new thread at the children's priority (see `warm`)."""
    nice = _child_nice()
    failed: list[BaseException] = []

    def start() -> None:
        if sys.platform == "linux":
            try:  # (and the ordinary policy, should the caller's thread have another: see charter.db)
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError:
                pass
        try:
            ensure_running()  # (at once when the server is alive)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=start, name="charter-forkserver-start", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


async def run_in_child(job: Callable[[], T]) -> T:
    """`job()` in a child process, niced; its result (or its exception) comes back pickled."""

    def submit() -> tuple[ProcessPoolExecutor, Future[T]]:
        warm()
        pool = ProcessPoolExecutor(max_workers=1, mp_context=context(), initializer=_child_start,
                                   initargs=(_child_nice(),))
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

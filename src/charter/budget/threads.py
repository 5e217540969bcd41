"""The worker threads that ask a remote ledger (PostgreSQL) on the event loop's behalf, counted.

A call to PostgreSQL from the loop goes to a thread (see `Governance.admit_spend_async`), and a
thread cannot be stopped: one may wait on a row lock that another daemon holds, or still be giving
back the reservation of a caller that hung up. Closing the ledger under such a call would cut its
connection mid-transaction. So every such call is submitted here, counted from its submission (a
call still queued counts too) until it returns or is cancelled before it started, and `close`
waits, for a bounded time, until none is left; only then is the ledger closed. A call submitted
after that is refused with a clear error; one still queued when the wait ran out runs, and the
closed ledger refuses it (`ledger_closed`), so a release left over is logged, never lost unseen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from charter.errors import LEDGER_CLOSED, CharterError

T = TypeVar("T")

log = logging.getLogger("charter.budget")

WORKERS = 8  # threads at most: a few row-lock waits must not hold every other call back


def ledger_closed() -> CharterError:
    """What a ledger call gets once the daemon has closed its ledger."""
    return CharterError(LEDGER_CLOSED, "the budget ledger is closed (the daemon is stopping)", "budget")


class LedgerThreads:
    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="charter-ledger")
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False

    @property
    def running(self) -> int:
        """Calls submitted and not yet finished."""
        with self._cond:
            return self._running

    def submit(self, fn: Callable[..., T], /, *args: Any, **kw: Any) -> concurrent.futures.Future[T]:
        """Run `fn` on a ledger thread (with the caller's context variables, as `asyncio.to_thread`)."""
        with self._cond:
            if self._closed:
                raise ledger_closed()
            self._running += 1
        try:
            future = self._pool.submit(contextvars.copy_context().run, fn, *args, **kw)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    async def call(self, fn: Callable[..., T], /, *args: Any, **kw: Any) -> T:
        """`fn` on a ledger thread, awaited from the loop. Cancelling the caller cancels a call not
        yet started; one already running finishes (and is waited for by `close`)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kw))

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no call is running or queued; True if none is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0, timeout)

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every call to finish, then refuse new ones. Calls may
        still be submitted while it waits (a cancelled caller's release). True if none was left.
        Closing again returns at once."""
        with self._cond:
            if self._closed:
                return self._running == 0
            idle = self._cond.wait_for(lambda: self._running == 0, timeout)
            left, self._closed = self._running, True
        if not idle:
            log.warning("%d budget ledger calls still running after %gs; closing the ledger under them "
                        "(their reservations are booked or given back at their expiry)", left, timeout,
                        extra={"fields": {"running": left}})
        self._pool.shutdown(wait=False)  # still queued (after a timeout): run, and refused by the closed ledger
        return idle

    def _finished(self, _future: object) -> None:
        with self._cond:
            self._running -= 1
            if self._running == 0:
                self._cond.notify_all()

"""The ledger's worker threads are counted, so that a daemon closing its ledger waits for the calls
still running (a reservation on another daemon's row lock, a cancelled caller's release) instead of
closing connections under them, and refuses calls after that with a clear error."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import pytest

from charter.budget.threads import LedgerThreads
from charter.errors import HTTP_STATUS, LEDGER_CLOSED, CharterError


def test_close_waits_for_a_running_call_and_for_one_submitted_meanwhile() -> None:
    threads = LedgerThreads()
    go, done = threading.Event(), []
    threads.submit(lambda: (go.wait(5), done.append("first")))
    closer = threading.Thread(target=lambda: done.append(("closed", threads.close(5))))
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive(), "close returned while a call was still running"
    threads.submit(lambda: done.append("second"))  # a release submitted while close waits: it runs
    time.sleep(0.1)
    go.set()
    closer.join(5)
    assert done[-1] == ("closed", True) and set(done[:-1]) == {"first", "second"}
    assert threads.running == 0


def test_after_close_a_call_is_refused_with_a_clear_error() -> None:
    threads = LedgerThreads()
    assert threads.submit(lambda: 41 + 1).result(5) == 42
    assert threads.close(1) is True
    with pytest.raises(CharterError) as exc:
        threads.submit(lambda: None)
    assert exc.value.code == LEDGER_CLOSED and "closed" in exc.value.message
    assert HTTP_STATUS[LEDGER_CLOSED] == 503
    assert threads.close(1) is True  # closing twice is harmless


def test_close_gives_up_after_its_timeout_and_says_how_many_were_left(caplog: pytest.LogCaptureFixture) -> None:
    threads = LedgerThreads()
    stuck = threading.Event()
    threads.submit(stuck.wait, 10)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="charter.budget"):
        assert threads.close(0.2) is False
    assert 0.15 < time.monotonic() - started < 3
    assert "1 budget ledger calls still running" in caplog.text
    stuck.set()


def test_a_queued_call_cancelled_before_it_started_is_not_waited_for() -> None:
    threads = LedgerThreads(workers=1)
    go = threading.Event()
    threads.submit(go.wait, 5)
    queued = threads.submit(lambda: "never")
    assert threads.running == 2
    assert queued.cancel()
    assert threads.running == 1
    go.set()
    assert threads.close(5) is True


def test_a_caller_cancelled_on_the_loop_leaves_its_call_running_and_counted() -> None:
    """`call` from the loop: the awaiting task is cancelled (a client hung up), the thread cannot
    be, and close still waits for it."""
    threads = LedgerThreads()
    started, go, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        go.wait(5)
        finished.set()

    async def main() -> None:
        task = asyncio.ensure_future(threads.call(slow))
        assert await asyncio.to_thread(started.wait, 5)  # running: the thread cannot be cancelled now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert threads.running == 1

    asyncio.run(main())
    threading.Timer(0.2, go.set).start()
    assert threads.close(5) is True and finished.is_set()


def test_context_variables_reach_the_thread() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def main() -> str:
        var.set("from the caller")
        return await threads.call(var.get)

    threads = LedgerThreads()
    assert asyncio.run(main()) == "from the caller"
    threads.close(1)


def test_a_release_no_one_waits_for_warns_only_when_money_stays_held(caplog: pytest.LogCaptureFixture) -> None:
    """A reservation settled or released already (CONFLICT) holds nothing: no warning. Any other
    failure leaves it held until its expiry, and says so."""
    from charter.budget.handoff import release_quietly
    from charter.errors import CONFLICT, NOT_FOUND

    def failing(code: str) -> Callable[[str], None]:
        def release(rid: str) -> None:
            raise CharterError(code, f"reservation {rid}: {code}", "reservation_id")
        return release

    with caplog.at_level(logging.DEBUG, logger="charter.budget"):
        release_quietly(failing(CONFLICT), "res_settled")
        release_quietly(failing(NOT_FOUND), "res_unknown")
        release_quietly(lambda rid: (_ for _ in ()).throw(OSError("database is locked")), "res_locked")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2 and all("stays held until its expiry" in m for m in warned)
    assert "res_unknown" in warned[0] and "res_locked" in warned[1]
    assert not any("res_settled" in m for m in warned)

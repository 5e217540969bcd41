"""Noticing a client that hangs up before its answer has begun (or, for a whole answer, ended).

A streamed answer watches for the hang-up once it is sending (`streaming.WatchedStream`). Before
that, the handler waits for the router's first piece, and for a whole answer, for all of it,
reading nothing from the client meanwhile: a client gone during a slow prompt, a cold load or a
failover went unnoticed, and the router went on down the chain, onto a paid backend too, for
nobody. `HangUpWatch` cancels the handler's task when the client disconnects, so the router's call
ends (the backend sees its request cancelled) and settles what went out.

It starts listening only after `grace` seconds: most answers have begun by then, and a timer that
never fires costs far less than a task per request. A hang-up within the grace is noticed at its
end.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

GRACE_S = 0.05


class HangUpWatch:
    """`async with HangUpWatch(receive): ...`; afterwards `gone` says whether the client left, in
    which case the block was cancelled and the cancellation absorbed here."""

    def __init__(self, receive: Any, grace: float = GRACE_S) -> None:
        self._receive = receive
        self._grace = grace
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._active = False
        self.gone = False

    async def __aenter__(self) -> HangUpWatch:
        self._task = asyncio.current_task()
        self._active = True
        self._timer = asyncio.get_running_loop().call_later(self._grace, self._listen)
        return self

    def _listen(self) -> None:
        if self._active:
            self._watcher = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        # The request's body has been read: what comes now is the disconnect, if anything.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self._active and self._task is not None:
            self.gone = True
            self._task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        self._active = False
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:  # before a WatchedStream begins receive()ing in its place
            self._watcher.cancel()
        # Ours, because the client left: absorbed. Another cancellation besides (shutdown) goes up.
        return kind is asyncio.CancelledError and self.gone and self._task is not None \
            and self._task.uncancel() == 0

"""A streamed answer that stops when its client goes away, without a task group per response.

Starlette's `StreamingResponse`, under an ASGI server older than spec 2.4 (uvicorn's httptools
protocol says 2.3), runs every response in an anyio task group: the body in a new task, a
listener for `http.disconnect` in the caller's, and a cancel scope to end whichever outlives the
other. On a model call of a few milliseconds that machinery was a large part of what a stream
cost beyond a plain relay.

`WatchedStream` keeps the same contract with plain asyncio: the body is sent from the caller's
task, and one small task waits on `receive()`; a disconnect cancels the sender (so a backend
call blocked between tokens ends at once, as it did, and settles what was delivered). The
cancellation is then taken back (`Task.uncancel`) and the response ends quietly, as Starlette's
does; any other cancellation (the server shutting down) goes on up. The background task runs
after the body either way, so a call's event records a client that went away.

A client that stays connected but stops reading is handled the same way once it has left one
chunk untaken for `stall` seconds: uvicorn's `send()` waits (for the transport to drain) as long as
the client does, and meanwhile the backend's answer stays open, holding, on Ollama, a slot that
every other agent queues for. One timer per stream checks for it, re-armed at most once per
`stall`, so the chunks themselves pay only for noting when each send began. The connection is
then reset (`server/http_protocol`), so that its unsent bytes are not kept for a reader that never
comes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.responses import StreamingResponse

# The key, in scope["extensions"], of a callable that resets the connection (server/http_protocol).
ABORT = "charter.abort"

log = logging.getLogger("charter.server")


class WatchedStream(StreamingResponse):
    def __init__(self, *args: Any, stall: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stall = stall
        self.stalled = False  # ended because its client stopped reading (see the module's doc)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        sender = asyncio.current_task()
        assert sender is not None
        state = {"sending": True, "cancelled": False}
        stop_timer: Callable[[], None] | None = None
        if self.stall is not None:
            abort = (scope.get("extensions") or {}).get(ABORT)
            send, stop_timer = self._watch_sends(send, sender, state, abort)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if state["sending"] and not state["cancelled"]:
                state["cancelled"] = True
                sender.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        watcher.add_done_callback(_retrieve)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # Ours, sent because the client left: taken back, and the answer just ends. Another
            # cancellation besides (the server shutting down) still goes on up.
            if not state["cancelled"] or sender.uncancel() > 0:
                raise
        finally:
            state["sending"] = False
            watcher.cancel()
            if stop_timer is not None:
                stop_timer()
            # Cancelled inside send() (a client that stopped reading, then left), the body was
            # never told: close it now, so the call settles what went out before its event is
            # written, not whenever the abandoned generators are collected.
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
        if self.stalled:  # (uvicorn hears of the reset connection, so it sees a client gone, not an error)
            await asyncio.sleep(0)
        if self.background is not None:
            await self.background()

    def _watch_sends(self, send: Any, sender: asyncio.Task[Any], state: dict[str, bool],
                     abort: Callable[[], None] | None) -> tuple[Any, Callable[[], None]]:
        """`send`, noting when each call began; and how to stop the timer that ends a send stuck
        past `stall` (it re-arms itself for the current send's deadline, or a full `stall` on)."""
        loop = asyncio.get_running_loop()
        stall = self.stall
        assert stall is not None
        began: list[float | None] = [None]

        async def timed_send(message: Any) -> None:
            began[0] = loop.time()
            await send(message)
            began[0] = None

        def check() -> None:
            if state["cancelled"]:  # the client left meanwhile: ended already
                return
            start, now = began[0], loop.time()
            if start is not None and now - start >= stall and state["sending"]:
                self.stalled = state["cancelled"] = True
                sender.cancel()
                if abort is not None:  # reset the connection: its unsent bytes are dropped, not kept for it
                    abort()
                return
            timer[0] = loop.call_at((start if start is not None else now) + stall, check)

        timer = [loop.call_at(loop.time() + stall, check)]
        return timed_send, lambda: timer[0].cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A watcher that failed (receive() raised) is logged by asyncio only if nobody looked."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("the disconnect watcher of a streamed answer failed: %r", task.exception())

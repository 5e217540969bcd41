"""`HangUpWatch`: a client's disconnect cancels the work it waits for, and nothing else does.

The daemon-level behaviour (a hang-up before the first token ends the backend's request and books
the prompt) is in tests/gateway/test_gateway_spend.py; here, the contract at its edges, with an
ASGI `receive` fed by hand."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from charter.server.hangup import HangUpWatch

pytestmark = pytest.mark.anyio


class Client:
    """An ASGI receive(): waits until the test says the client disconnected; counts its callers."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


async def test_a_disconnect_cancels_the_block_and_is_absorbed() -> None:
    client = Client()
    reached_end = False
    t0 = time.monotonic()
    async with HangUpWatch(client.receive, grace=0.01) as watch:
        asyncio.get_running_loop().call_later(0.1, client.left.set)
        await asyncio.sleep(10)  # a backend that has not answered
        reached_end = True
    assert watch.gone and not reached_end
    assert time.monotonic() - t0 < 2  # at the hang-up, not at the backend's pace
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # taken back


async def test_a_disconnect_within_the_grace_is_noticed_at_its_end() -> None:
    client = Client()
    client.left.set()  # gone before the watch began listening
    t0 = time.monotonic()
    async with HangUpWatch(client.receive, grace=0.2) as watch:
        await asyncio.sleep(10)
    assert watch.gone and 0.15 <= time.monotonic() - t0 < 2


async def test_work_done_within_the_grace_never_listens() -> None:
    client = Client()
    async with HangUpWatch(client.receive, grace=0.05) as watch:
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    assert not watch.gone and client.calls == 0  # no task, no receive(): a timer, cancelled


async def test_a_client_still_there_changes_nothing() -> None:
    client = Client()
    async with HangUpWatch(client.receive, grace=0.01) as watch:
        await asyncio.sleep(0.1)
    assert not watch.gone and client.calls == 1
    client.left.set()  # leaving afterwards cancels nothing: the watch is over
    await asyncio.sleep(0.05)


async def test_a_shutdown_is_not_mistaken_for_a_hang_up() -> None:
    """A cancellation from elsewhere (the server stopping) goes on up, even if the client left too."""
    client = Client()

    async def handler() -> None:
        async with HangUpWatch(client.receive, grace=0.01):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0.05)
    task.cancel()  # the server
    client.left.set()  # and the client, in the same moment
    with pytest.raises(asyncio.CancelledError):
        await task

"""The SDK's client and a daemon that closed a pooled connection just as the next call went out.

uvicorn closes idle keep-alive connections on its own schedule; a call that goes out on one it has
just closed fails before any answer. The SDK then retries once on a fresh connection, signed afresh
(a request signature is good for one request), and only when the connection was a reused one: a
server that drops a fresh connection is unreachable, and the caller hears so. A raw-socket server
plays the daemon, so each case happens every time.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.sdk.http import SignedClient

pytestmark = pytest.mark.anyio
BODY = b'{"ok": true}'


class Daemonish:
    """Answers the first request on each connection; drops the connection at the second, unanswered.

    With `mute`, drops every connection as soon as a request arrives.
    """

    def __init__(self, *, mute: bool = False) -> None:
        self.mute = mute
        self.connections = 0
        self.authorizations: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _request(self, reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        self.authorizations.append(fields.get("authorization", ""))
        await reader.readexactly(int(fields.get("content-length", "0")))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self._request(reader)
        if not self.mute:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await writer.drain()
            with contextlib.suppress(Exception):
                await self._request(reader)  # the client pooled the connection and sends again
        writer.transport.abort()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_call_on_a_connection_the_daemon_just_closed_is_sent_again_signed_afresh() -> None:
    server = Daemonish()
    client = SignedClient(await server.start(), "agt_test", SigningKey.generate())
    try:
        assert await client.call("POST", "/v1/publish", json={"n": 1}) == {"ok": True}
        assert await client.call("POST", "/v1/publish", json={"n": 2}) == {"ok": True}
        assert server.connections == 2
        first, dropped, retried = server.authorizations
        assert len({first, dropped, retried}) == 3  # every attempt carries its own signature
    finally:
        await client.close()
        await server.stop()


async def test_a_daemon_that_drops_a_fresh_connection_is_unreachable_without_a_second_try() -> None:
    server = Daemonish(mute=True)
    client = SignedClient(await server.start(), "agt_test", SigningKey.generate())
    try:
        with pytest.raises(CharterError) as err:
            await client.call("POST", "/v1/publish", json={"n": 1})
        assert err.value.code == "unreachable"
        assert server.connections == 1
    finally:
        await client.close()
        await server.stop()

"""A backend that dies while a keep-alive connection sits in the pool.

The next request is written to a socket the backend already closed. Without a retry on a fresh
connection the gateway reports an opaque write error instead of what happened: the backend is down
(`refused`) or was restarted (the call simply succeeds). The retry is for reused connections only:
a backend that drops a fresh connection has failed, and the router must see it (no second try).
A real raw-socket server plays the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import orjson
import pytest

from charter.models.backends.ollama import OllamaBackend
from charter.models.types import BackendError, ChatRequest, Final

ANSWER = b"".join(orjson.dumps(line) + b"\n" for line in (
    {"model": "m", "message": {"role": "assistant", "content": "hello"}, "done": False},
    {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
     "prompt_eval_count": 3, "eval_count": 1},
))


class OneShotBackend:
    """Answers every request on a fresh connection, then closes that connection without a word.

    With `mute`, drops every connection as soon as a request arrives, without an answer.
    """

    def __init__(self, *, mute: bool = False, early: bool = False) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.mute = mute
        self.early = early  # with mute: reset as soon as the headers are in, while the body is still coming

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.early:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()
            return
        await self._read_request(reader)
        if self.mute:
            writer.transport.abort()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: keep-alive\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER)
        await writer.drain()
        with contextlib.suppress(Exception):  # the client pooled the connection and sends again:
            await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # RST with no answer, as a process killed at that moment would

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)

    def stop_listening(self) -> None:
        """The listener goes; the pooled connection stays open until it is used."""
        assert self.server is not None
        self.server.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def chat(backend: OllamaBackend, prompt: str = "hi") -> str:
    req = ChatRequest(messages=[{"role": "user", "content": prompt}])
    text = ""
    async for part in backend.stream("m", req, first_token=2.0, idle=2.0, total=5.0):
        if not isinstance(part, Final):
            text += part
    return text


@pytest.mark.anyio
async def test_a_restarted_backend_is_reached_on_a_fresh_connection() -> None:
    server = OneShotBackend()
    port = await server.start()
    backend = OllamaBackend("primary", f"http://127.0.0.1:{port}")
    try:
        assert await chat(backend) == "hello"
        assert await chat(backend) == "hello"  # the pooled socket died under the request
        assert server.connections == 2
    finally:
        await backend.close()
        await server.stop()


@pytest.mark.anyio
async def test_a_dead_backend_behind_a_pooled_connection_reads_as_refused() -> None:
    server = OneShotBackend()
    port = await server.start()
    backend = OllamaBackend("primary", f"http://127.0.0.1:{port}")
    try:
        assert await chat(backend) == "hello"
        server.stop_listening()
        with pytest.raises(BackendError) as err:
            await chat(backend)
        assert err.value.kind == "refused", err.value
        with socket.socket() as probe:  # and the port really is closed
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        await backend.close()


@pytest.mark.anyio
async def test_a_fresh_connection_dropped_is_the_backends_failure_and_not_retried() -> None:
    server = OneShotBackend(mute=True)
    port = await server.start()
    backend = OllamaBackend("primary", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(BackendError) as err:
            await chat(backend)
        assert err.value.kind == "disconnected", err.value
        assert server.connections == 1
    finally:
        await backend.close()
        await server.stop()


@pytest.mark.anyio
async def test_a_reset_while_the_request_is_still_being_written_reads_as_disconnected() -> None:
    """A process that dies with a large request half-sent: the client's write meets the reset
    (ECONNRESET or EPIPE, as aiohttp's ClientOSError). That is the backend going away, not an
    HTTP protocol error."""
    server = OneShotBackend(mute=True, early=True)
    port = await server.start()
    backend = OllamaBackend("primary", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(BackendError) as err:
            await chat(backend, "x" * 4_000_000)
        assert err.value.kind == "disconnected", err.value
        assert server.connections == 1
    finally:
        await backend.close()
        await server.stop()

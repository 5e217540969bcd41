"""MCP over this process's stdin/stdout on non-blocking pipes.

The SDK's `mcp.server.stdio.stdio_server` reads and writes standard streams through anyio's
thread-backed file wrappers: a worker-thread round trip for every line read and two for every
message written. For the proxy that is most of the latency it adds to a tool call, so when both
standard streams are pipes, sockets or terminals (as an assistant starts an MCP server), this does
the same job on the event loop's own non-blocking pipe transports; otherwise it falls back to the
SDK's transport. Like the SDK's, it moves fd 0 to /dev/null and fd 1 to stderr while it serves, so
a stray print or a child process cannot corrupt the protocol stream, and restores them afterwards.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp.types as mt
from mcp.shared.message import SessionMessage

MAX_LINE = 64 * 2**20


def _pipe_like(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


@asynccontextmanager
async def raw_stdio() -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """This process's stdin and stdout as asyncio streams, with fd 0 and 1 moved out of harm's way.

    Only for pipes, sockets and terminals (`pipe_like()`); restores both descriptors on exit.
    """
    loop = asyncio.get_running_loop()
    wire_in, wire_out = os.dup(0), os.dup(1)
    saved_in, saved_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=MAX_LINE)
    r_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                  os.fdopen(wire_in, "rb", buffering=0))
    w_transport, w_protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            os.fdopen(wire_out, "wb", buffering=0))
    try:
        yield reader, asyncio.StreamWriter(w_transport, w_protocol, None, loop)
    finally:
        r_transport.close()
        w_transport.close()
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)


def pipe_like() -> bool:
    return _pipe_like(0) and _pipe_like(1)


@asynccontextmanager
async def stdio_transport() -> AsyncIterator[tuple[Any, Any]]:
    """`(read_stream, write_stream)` of SessionMessage for `Server.run`, like the SDK's `stdio_server()`."""
    if not pipe_like():
        from mcp.server.stdio import stdio_server

        async with stdio_server() as streams:
            yield streams
        return
    to_server, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, from_server = anyio.create_memory_object_stream[SessionMessage](0)
    async with raw_stdio() as (reader, writer):

        async def read_lines() -> None:
            async with to_server:
                while line := await reader.readline():
                    if not line.strip():
                        continue
                    try:
                        item: SessionMessage | Exception = SessionMessage(
                            mt.jsonrpc_message_adapter.validate_json(line, by_name=False))
                    except Exception as exc:  # noqa: BLE001 - handed to the session, as the SDK does
                        item = exc
                    try:
                        await to_server.send(item)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return

        async def write_lines() -> None:
            async with from_server:
                async for message in from_server:
                    writer.write(message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n")
                    if writer.transport.get_write_buffer_size() > 2**20:
                        await writer.drain()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines)
            tg.start_soon(write_lines)
            try:
                yield read_stream, write_stream
            finally:
                tg.cancel_scope.cancel()

"""Telling a stale keep-alive connection from a dead server, for the HTTP clients Charter runs.

A pooled connection can be closed by the other end (a restart, a crash, its idle timeout) just as
a request goes out on it; the request then fails before any answer. That is not the server's
failure: the same request on a fresh connection either works or meets the real problem. So a
client retries once, and only when the failed request went out on a reused connection (Go's
http.Transport follows the same rule); an aiohttp trace hook says which connection it was.
"""

from __future__ import annotations

from typing import Any

import aiohttp

# What a request that died on its connection before any answer raises.
STALE_ERRORS = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


class ReuseProbe:
    """Pass as `trace_request_ctx`; `reused` is True if the request went out on a pooled connection."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


async def _on_reuse(_session: aiohttp.ClientSession, ctx: Any, _params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, ReuseProbe):
        ctx.trace_request_ctx.reused = True


def reuse_trace() -> aiohttp.TraceConfig:
    """The trace config that fills a `ReuseProbe`; give it to the ClientSession."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_on_reuse)
    return trace

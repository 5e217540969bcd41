"""The proxy's fast path for a stdio downstream: a JSON-RPC relay that decides every `tools/call`.

Between an assistant on our stdin/stdout and a downstream server on a child process's pipes, each
message is one line of JSON. The relay parses it (orjson) only to read `method` and `id`, and passes
the line itself on, byte for byte, except where Charter has a say:

* `tools/call`: decided first (`GoverningProxy.decide`: the daemon's `act()`, an approval wait where
  the policy asks for one); allowed, the original line goes to the downstream; otherwise the relay
  answers itself with an `isError` result naming the reason. A `tools/call` without an id (which
  would run without anyone seeing the answer) is dropped.
* the response to `tools/list`: only the tools the policy could ever allow are kept;
* the responses to `initialize` and `server/discover`: the `resources`, `prompts` and `completions`
  capabilities are removed, and requests for them are answered "method not found": only tools,
  which can be governed, are forwarded;
* JSON-RPC batches (no longer part of MCP) are refused, so no call can hide in one.

Everything else (the handshake, pings, notifications, progress, the downstream's own requests to the
client such as sampling and elicitation, and their answers) passes through untouched, whichever
protocol version the two ends agree on. The relay originates no request of its own toward either
side, so ids never collide. The SDK-based proxy (`GoverningProxy` as an MCP server and client) serves
a streamable HTTP downstream; this path exists because it adds a fraction of the latency (see
benchmarks/mcp_proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import orjson

from charter.errors import NOT_FOUND, CharterError
from charter.mcp.proxy import GoverningProxy
from charter.mcp.stdio import MAX_LINE, raw_stdio

log = logging.getLogger("charter.mcp.relay")
PARSE_ERROR, METHOD_NOT_FOUND, INVALID_REQUEST, INVALID_PARAMS = -32700, -32601, -32600, -32602
HIDDEN_CAPABILITIES = ("resources", "prompts", "completions")
BLOCKED_PREFIXES = ("resources/", "prompts/", "completion/")
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
STOP_GRACE = 2.0


def _key(request_id: Any) -> tuple[str, Any]:
    return (type(request_id).__name__, request_id)


def refusal_result(request_id: Any, exc: CharterError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id,
            "result": {"content": [{"type": "text", "text": str(exc)}], "structuredContent": {"error": exc.to_dict()},
                       "isError": True, "resultType": "complete"}}


def error_response(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


class StdioRelay:
    def __init__(self, gov: GoverningProxy, params: Any, *, name_given: bool) -> None:
        self.gov = gov
        self.params = params  # mcp.StdioServerParameters, from launch.stdio_params
        self.name_given = name_given
        self.watch: dict[tuple[str, Any], str] = {}  # request id -> method whose response the relay edits
        self.deciding: set[tuple[str, Any]] = set()  # tools/call ids waiting for their decision
        self.cancelled: set[tuple[str, Any]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.up: asyncio.StreamWriter | None = None
        self.proc: asyncio.subprocess.Process | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def to_client(self, message: dict[str, Any]) -> None:
        assert self.up is not None
        self.up.write(orjson.dumps(message) + b"\n")

    def to_server(self, line: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.write(line if line.endswith(b"\n") else line + b"\n")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start_downstream(self) -> None:
        from mcp.client.stdio import get_default_environment

        p = self.params
        try:
            self.proc = await asyncio.create_subprocess_exec(
                p.command, *p.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
                cwd=str(p.cwd) if p.cwd else None, env=get_default_environment() | (p.env or {}),
                start_new_session=True, limit=MAX_LINE)
        except OSError as exc:
            raise CharterError(NOT_FOUND, f"cannot start the downstream MCP server {p.command}: {exc}", "command") from None

    async def stop_downstream(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
                return
            except TimeoutError:
                continue

    # -- the assistant's messages ----------------------------------------------------------------

    def from_client(self, line: bytes) -> None:
        # What goes on is what was parsed here, re-encoded: a line that parsers could read two ways
        # (duplicate keys, say) cannot show the proxy one method and the downstream another.
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.to_client(error_response(None, PARSE_ERROR, "not a JSON-RPC message the Charter proxy can read"))
            return
        if isinstance(msg, list):
            self.to_client(error_response(None, INVALID_REQUEST, "JSON-RPC batches are not supported by the Charter "
                                                                 "proxy: send one message a line"))
            return
        if not isinstance(msg, dict):
            self.to_client(error_response(None, INVALID_REQUEST, "a JSON-RPC message is an object"))
            return
        line = orjson.dumps(msg)
        method, has_id = msg.get("method"), "id" in msg
        if method == "tools/call":
            if has_id:
                self.spawn(self.govern_call(msg, line))
            return  # a call without an id would run unseen: dropped
        if isinstance(method, str) and method.startswith(BLOCKED_PREFIXES):
            if has_id:
                self.to_client(error_response(msg["id"], METHOD_NOT_FOUND, f"{method}: the Charter proxy forwards "
                                              "the downstream server's tools only"))
            return
        if has_id and method in ("tools/list", "initialize", "server/discover"):
            self.watch[_key(msg["id"])] = method
        if method == "notifications/cancelled":
            rid = (msg.get("params") or {}).get("requestId") if isinstance(msg.get("params"), dict) else None
            if rid is not None and _key(rid) in self.deciding:
                self.cancelled.add(_key(rid))
        self.to_server(line)

    async def govern_call(self, msg: dict[str, Any], line: bytes) -> None:
        rid = msg["id"]
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        name, args = params.get("name"), params.get("arguments") or {}
        if not isinstance(name, str) or not isinstance(args, dict):
            self.to_client(error_response(rid, INVALID_PARAMS, "tools/call needs a tool name and an arguments object"))
            return
        token = (params.get("_meta") or {}).get("progressToken") if isinstance(params.get("_meta"), dict) else None

        async def progress(elapsed: float, message: str) -> None:
            if token is not None:
                self.to_client({"jsonrpc": "2.0", "method": "notifications/progress",
                                "params": {"progressToken": token, "progress": elapsed, "message": message}})

        key = _key(rid)
        self.deciding.add(key)
        try:
            answer = await self.gov.decide(self.gov.action(name), args, progress)
        except CharterError as exc:  # revoked, suspended, daemon unreachable: refused, never passed on
            self.to_client(refusal_result(rid, exc))
            return
        finally:
            self.deciding.discard(key)
        if key in self.cancelled:
            self.cancelled.discard(key)
            return  # the client gave up while the call waited: it does not run
        if answer["effect"] == "allow":
            self.to_server(line)
        else:
            self.to_client(refusal_result(rid, self.gov.refusal_error(answer)))

    # -- the downstream's messages ---------------------------------------------------------------

    def from_server(self, line: bytes) -> None:
        if not self.watch:  # nothing to edit on the way back: pass it on unread
            assert self.up is not None
            self.up.write(line if line.endswith(b"\n") else line + b"\n")
            return
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            msg = None
        method = self.watch.pop(_key(msg["id"]), None) if isinstance(msg, dict) and "method" not in msg \
            and "id" in msg else None
        if method is None or not isinstance(msg.get("result"), dict):  # type: ignore[union-attr]
            assert self.up is not None
            self.up.write(line if line.endswith(b"\n") else line + b"\n")
            return
        if method == "tools/list":
            self.spawn(self.filter_tools(msg))  # type: ignore[arg-type]
        else:
            self.to_client(self.trim_capabilities(msg))  # type: ignore[arg-type]

    def trim_capabilities(self, msg: dict[str, Any]) -> dict[str, Any]:
        result = msg["result"]
        caps = result.get("capabilities")
        if isinstance(caps, dict):
            result["capabilities"] = {k: v for k, v in caps.items() if k not in HIDDEN_CAPABILITIES}
        if not self.name_given:
            info = result.get("serverInfo") or (result.get("_meta") or {}).get(SERVER_INFO_KEY) or {}
            if isinstance(info, dict) and isinstance(info.get("name"), str) and info["name"]:
                self.gov.set_server_name(info["name"])
                self.name_given = True
        return msg

    async def filter_tools(self, msg: dict[str, Any]) -> None:
        tools = msg["result"].get("tools")
        if not isinstance(tools, list):
            self.to_client(msg)
            return
        named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
        try:
            shown = await self.gov.backend.visible([self.gov.action(t["name"]) for t in named])
        except CharterError as exc:
            self.to_client(error_response(msg["id"], INVALID_REQUEST, f"Charter refused to list tools for "
                                          f"{self.gov.backend.name}: {exc}", exc.to_dict()))
            return
        msg["result"]["tools"] = [t for t in named if shown.get(self.gov.action(t["name"]))]
        self.to_client(msg)

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.start_downstream()
        assert self.proc is not None and self.proc.stdout is not None
        downstream = self.proc.stdout
        async with raw_stdio() as (reader, writer):
            self.up = writer

            async def client_side() -> None:
                while line := await reader.readline():
                    if line.strip():
                        self.from_client(line)

            async def server_side() -> None:
                while line := await downstream.readline():
                    if line.strip():
                        self.from_server(line)

            pumps = [asyncio.ensure_future(client_side()), asyncio.ensure_future(server_side())]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        print(f"charter mcp proxy: {task.exception()}", file=sys.stderr)
            finally:
                for task in [*pumps, *self.tasks]:
                    task.cancel()
                await self.stop_downstream()
                with contextlib.suppress(Exception):
                    await writer.drain()

"""The governing MCP proxy: another MCP server's tools, behind the agent's policy.

    charter mcp proxy --creds alpha.creds.json [--name fs] -- npx -y @modelcontextprotocol/server-filesystem .
    charter mcp proxy --creds alpha.creds.json --name github --url https://example.internal/mcp

The assistant talks to the proxy over stdio; the proxy talks to the downstream server over stdio (a
process it starts as the agent, in its sandbox: `launch.py`) or streamable HTTP (`--url`). A stdio
downstream is served by the JSON-RPC relay in `relay.py` (the fast path); an HTTP one, or an assistant
not on pipes, by `GoverningProxy` below: the official SDK's server towards the assistant and its
client session towards the downstream. Both decide the same way, with `GoverningProxy.decide`.
For every `tools/call`:

1. the call is the action `mcp.<server>.<tool>` (`naming.py`) with the tool's arguments as attributes,
   decided by the daemon with `act()`, which publishes the decision on `charter.decisions.<agent>`;
2. allow: the call goes to the downstream server and its result comes back unchanged (only the
   reserved `serverInfo` stamp in `_meta`, which names the hop that answered, is the proxy's own);
3. deny: a tool result with `isError`, the reason and the rule; the downstream never sees the call;
4. approve (T3, or an approve rule): the proxy waits up to `--approval-wait` seconds for the
   operator. Approved, the call runs exactly once (a one-shot approval is claimed by this call);
   denied or expired, it is refused; still undecided, it is refused with the approval's id, and the
   same call made again waits on that same approval instead of asking anew.

`tools/list` shows only the tools the policy could ever allow (`visibility.py`). The downstream's
resources and prompts are not exposed through the proxy: only what can be governed is forwarded.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mcp.types as mt
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from charter import __version__
from charter.encoding import canonical
from charter.errors import POLICY_DENIED, CharterError
from charter.mcp.backend import SdkBackend
from charter.mcp.naming import token, tool_action
from charter.mcp.server import refusal

log = logging.getLogger("charter.mcp.proxy")
APPROVAL_PENDING = "approval_pending"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
MAX_PAGES = 100
WAIT_STEP = 10.0  # seconds per long-poll while a call waits for the operator
Progress = Callable[[float, str], Awaitable[None]]


class GoverningProxy:
    def __init__(self, backend: SdkBackend, client: Any, server_name: str, *, approval_wait: float = 300.0) -> None:
        self.backend = backend
        self.client = client  # mcp.Client, connected to the downstream server
        self.server_name = token(server_name)
        self.approval_wait = approval_wait
        self._pending: dict[tuple[str, bytes], str] = {}  # (action, arguments) -> undecided approval

    def action(self, tool: str) -> str:
        return tool_action(self.server_name, tool)

    def set_server_name(self, name: str) -> None:
        self.server_name = token(name)

    # -- tools/list ------------------------------------------------------------------------------

    async def downstream_tools(self) -> list[mt.Tool]:
        tools: list[mt.Tool] = []
        cursor = None
        for _ in range(MAX_PAGES):
            page = await self.client.list_tools(cursor=cursor)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def list_tools(self, ctx: ServerRequestContext[Any], params: mt.PaginatedRequestParams | None
                         ) -> mt.ListToolsResult:
        tools = await self.downstream_tools()
        try:
            shown = await self.backend.visible([self.action(t.name) for t in tools])
        except CharterError as exc:
            raise MCPError(mt.INVALID_REQUEST, f"Charter refused to list tools for {self.backend.name}: {exc}",
                           exc.to_dict()) from None
        return mt.ListToolsResult(tools=[t for t in tools if shown.get(self.action(t.name))])

    # -- tools/call ------------------------------------------------------------------------------

    async def decide(self, action: str, args: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """The daemon's decision, waiting for the operator where the policy asks for an approval.

        The approval is asked for without waiting, so its id is known (and kept for this very call)
        before the wait starts; the wait goes in steps of at most 10 s, with a progress notification
        after each for clients that asked for progress (so they need not time out).
        """
        key = (action, canonical(args))
        aid = self._pending.get(key)
        asked_now = aid is None
        if aid is None:
            answer = {"action": action, **(await self.backend.act(action, args))}
            if answer["effect"] != "approve":
                return answer
            aid = answer["approval_id"]
            self._pending[key] = aid
        else:  # the same call, asked again: wait on the approval already open
            answer = {"action": action, "effect": "approve", "approval_id": aid}
        started = time.monotonic()
        deadline = started + self.approval_wait
        while True:
            left = deadline - time.monotonic()
            step = await self.backend.wait_approval(aid, max(0.0, min(left, WAIT_STEP)))
            answer = {**answer, **step}
            if answer["effect"] != "approve":
                self._pending.pop(key, None)
                if answer.get("state") == "expired" and not asked_now:
                    return await self.decide(action, args, progress)  # that one lapsed: ask anew
                return answer
            if left <= WAIT_STEP:
                return answer  # still undecided: refused for now, the approval stays open
            if progress is not None:
                await progress(time.monotonic() - started, f"waiting for the operator's approval {aid} of {action}")

    @staticmethod
    def refusal_error(answer: dict[str, Any]) -> CharterError:
        d = answer.get("decision") or {}
        action = answer["action"]
        rule = f" (rule {d['rule']}, {d['tier']})" if d.get("rule") else ""
        if answer["effect"] == "approve":
            aid = answer.get("approval_id")
            return CharterError(
                APPROVAL_PENDING, f"Charter holds {action} for the operator's approval {aid}{rule}: not decided "
                f"yet. The operator approves with `charter approvals approve {aid}`; then call this tool again.",
                "approval").with_details(answer)
        reason = answer.get("reason") or d.get("reason") or "denied by policy"
        return CharterError(POLICY_DENIED, f"Charter denied {action}: {reason}{rule}", "action").with_details(answer)

    async def call_tool(self, ctx: ServerRequestContext[Any], params: mt.CallToolRequestParams
                        ) -> mt.CallToolResult | mt.InputRequiredResult:
        action = self.action(params.name)

        async def progress(elapsed: float, message: str) -> None:
            await ctx.session.report_progress(elapsed, None, message)

        try:
            answer = await self.decide(action, dict(params.arguments or {}), progress)
        except CharterError as exc:  # revoked, suspended, daemon unreachable: refuse, never pass through
            return refusal(exc)
        if answer["effect"] != "allow":
            return refusal(self.refusal_error(answer))
        return await self.forward(params)

    async def forward(self, params: mt.CallToolRequestParams) -> mt.CallToolResult | mt.InputRequiredResult:
        try:
            result = await self.client.session.call_tool(
                params.name, params.arguments, input_responses=params.input_responses,
                request_state=params.request_state, allow_input_required=True)
        except MCPError:
            raise  # the downstream's own protocol error, unchanged
        except Exception as exc:  # noqa: BLE001 - the connection or the result broke: say where
            raise MCPError(mt.INTERNAL_ERROR, f"the downstream MCP server {self.server_name!r} failed: {exc}") from None
        if result.meta and SERVER_INFO_KEY in result.meta:
            result = result.model_copy(update={"meta": {k: v for k, v in result.meta.items() if k != SERVER_INFO_KEY}
                                               or None})
        return result

    def build(self, instructions: str | None = None) -> Server[Any]:
        note = (f"Tools of the MCP server {self.server_name!r}, governed by Charter for agent {self.backend.name}: "
                "each call is decided by the agent's policy; refusals name the reason and the rule.")
        return Server(f"charter-proxy-{self.server_name}", version=__version__, title=f"{self.server_name} via Charter",
                      instructions=f"{instructions}\n\n{note}" if instructions else note,
                      on_list_tools=self.list_tools, on_call_tool=self.call_tool)


async def run_proxy(creds: str | Path, command: list[str], *, url: str | None = None, name: str | None = None,
                    headers: dict[str, str] | None = None, pass_env: list[str] | None = None,
                    set_env: dict[str, str] | None = None, approval_wait: float = 300.0) -> None:
    """`charter mcp proxy`: serve the downstream's governed tools on this process's stdin/stdout."""
    from contextlib import AsyncExitStack

    from mcp import Client
    from mcp.client.stdio import stdio_client

    from charter.mcp.launch import stdio_params
    from charter.mcp.stdio import pipe_like, stdio_transport
    from charter.sdk import Agent

    agent = Agent.load(creds)
    backend = SdkBackend(agent)
    try:
        await agent.charter()  # refuses now, clearly, if the agent is revoked or the daemon is away
        async with AsyncExitStack() as stack:
            if url:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client

                http = await stack.enter_async_context(
                    httpx2.AsyncClient(headers=headers or {}, timeout=httpx2.Timeout(30.0, read=300.0)))
                transport: Any = streamable_http_client(url, http_client=http)
            else:
                params = stdio_params(creds, agent.creds.charter, command, pass_env=pass_env or [],
                                      set_env=set_env or {})
                if pipe_like():  # the fast path: relay the JSON-RPC lines, deciding every tools/call
                    from charter.mcp.relay import StdioRelay

                    gov = GoverningProxy(backend, None, name or Path(command[0]).stem, approval_wait=approval_wait)
                    await StdioRelay(gov, params, name_given=name is not None).run()
                    return
                transport = stdio_client(params, errlog=sys.stderr)
            client = await stack.enter_async_context(Client(transport))
            info = client.server_info
            server_name = name or (info.name if info and info.name else Path(command[0] if command else url or "mcp").stem)
            proxy = GoverningProxy(backend, client, server_name, approval_wait=approval_wait)
            server = proxy.build(client.session.instructions)
            async with stdio_transport() as (read, write):
                await server.run(read, write, server.create_initialization_options())
    finally:
        await agent.close()

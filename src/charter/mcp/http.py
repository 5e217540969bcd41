"""Charter's MCP server on the daemon, over streamable HTTP at `/mcp`, and the agent routes MCP needs.

Authentication is the agent's bearer key from enrolment (`Authorization: Bearer chk_...`, the same key
unmodified OpenAI and Ollama clients use). It is checked on every HTTP request, before the SDK sees
it, against the agent's live state, so a revoked or suspended agent's next request is refused with
401 and the reason; each tool call then re-reads the agent again. A stateful MCP session is bound to
the agent that opened it (the SDK answers 404 to anyone else presenting its id).

`add_mcp_routes(app, node, caller)` is the one call `server/app.py` makes. It adds:

* `/mcp`                           the MCP endpoint (streamable HTTP, both protocol eras)
* `POST /v1/agent/policy/check`    `{action, attrs}` -> the decision, without acting (no event)
* `POST /v1/agent/policy/visible`  `{actions: [...]}` -> which of them the policy could ever allow

and stops the SDK's session manager (started by the first MCP request) with the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from charter.bus.subjects import SubjectError, validate_subject
from charter.encoding import dumps
from charter.errors import BAD_REQUEST, CharterError
from charter.identity.registry import OPERATOR_ID, AgentRecord
from charter.node import Node, decode_json_body

Auth = Callable[..., Awaitable[AgentRecord]]
PATH = "/mcp"
MAX_ACTIONS = 1000
INVALID_REQUEST = -32600  # JSON-RPC


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


class McpEndpoint:
    """The ASGI app at /mcp: bearer authentication in front of the SDK's session manager.

    The SDK is imported, and its session manager started (in a task of its own, which owns the
    manager's task group), on the first request: a daemon that never serves MCP never pays for it.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.manager: Any = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def _build(self) -> Any:
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        from charter.mcp.backend import NodeBackend
        from charter.mcp.server import build_server

        node = self.node

        async def backend_for(ctx: Any) -> NodeBackend:
            request = ctx.request
            header = request.headers.get("authorization") if request is not None else None
            return NodeBackend(node, node.agent_for_bearer(header).id)

        host = node.config.daemon.host
        hosts = sorted({f"{host}:*", "127.0.0.1:*", "localhost:*", "[::1]:*"})
        return StreamableHTTPSessionManager(
            app=build_server(backend_for),
            security_settings=TransportSecuritySettings(
                enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                allowed_origins=[f"http://{h}" for h in hosts] + [f"https://{h}" for h in hosts]),
        )

    async def _started(self) -> Any:
        if self.manager is None:
            async with self._lock:
                if self.manager is None:
                    manager = self._build()
                    ready = asyncio.Event()

                    async def run() -> None:
                        async with manager.run():
                            ready.set()
                            await self._stop.wait()

                    runner = asyncio.get_running_loop().create_task(run(), name="charter-mcp")
                    started = asyncio.ensure_future(ready.wait())
                    await asyncio.wait({runner, started}, return_when=asyncio.FIRST_COMPLETED)
                    if not ready.is_set():  # the manager could not start: say why, on this request
                        started.cancel()
                        runner.result()
                        raise RuntimeError("the MCP session manager stopped before it started")
                    self._runner = runner
                    self.manager = manager
        return self.manager

    async def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            await asyncio.wait([self._runner], timeout=5)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        try:
            agent = self.node.agent_for_bearer(headers.get("authorization"))
        except CharterError as exc:
            # A JSON-RPC error body, so that MCP clients show the reason (the SDK's does), at HTTP 401.
            body = {"jsonrpc": "2.0", "id": None,
                    "error": {"code": INVALID_REQUEST, "message": f"Charter: {exc}", "data": exc.to_dict()}}
            response = _json(body, 401, {"WWW-Authenticate": f'Bearer realm="charter", error="invalid_token", '
                                                             f'error_description="{exc.code}"'})
            await response(scope, receive, send)
            return
        manager = await self._started()
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken

        # The SDK binds a stateful session to the principal that opened it.
        scope["user"] = AuthenticatedUser(AccessToken(token="", client_id=agent.id, scopes=[]))
        await manager.handle_request(scope, receive, send)


def add_mcp_routes(app: FastAPI, node: Node, caller: Auth) -> None:
    endpoint = McpEndpoint(node)
    app.router.routes.append(Route(PATH, endpoint=endpoint, name="mcp"))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                await endpoint.stop()

    app.router.lifespan_context = lifespan

    async def agent_body(request: Request) -> tuple[AgentRecord, dict[str, Any]]:
        body = await request.body()
        who = await caller(request, body)
        if who.id == OPERATOR_ID:
            raise CharterError(BAD_REQUEST, "this call is for an agent; the operator uses /v1/admin/policy/explain", "agent")
        data = decode_json_body(body) if body else {}
        if not isinstance(data, dict):
            raise CharterError(BAD_REQUEST, "body must be a JSON object", "body")
        return node.ensure_live(who.id), data

    @app.post("/v1/agent/policy/check", tags=["policy"],
              summary="The caller's policy decision for {action, attrs}, without acting (no event, no approval)")
    async def policy_check(request: Request) -> Response:
        who, data = await agent_body(request)
        action, attrs = data.get("action"), data.get("attrs") or {}
        if not isinstance(action, str) or not isinstance(attrs, dict):
            raise CharterError(BAD_REQUEST, "body is {\"action\": \"fs.read\", \"attrs\": {...}}", "action")
        return _json({"decision": node.gov.evaluate(who, action, attrs).to_dict()})

    @app.post("/v1/agent/policy/visible", tags=["policy"],
              summary="Which of these actions the caller's policy could ever allow (MCP tool lists)")
    async def policy_visible(request: Request) -> Response:
        from charter.mcp.visibility import visible

        who, data = await agent_body(request)
        actions = data.get("actions")
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions) or len(actions) > MAX_ACTIONS:
            raise CharterError(BAD_REQUEST, f"body is {{\"actions\": [...]}}, at most {MAX_ACTIONS} names", "actions")
        policy = node.gov.bound_policy(who)
        names = [a for a in actions if _concrete(a)]
        ok = visible(policy.engine if policy else None, node.gov.subject(who), names)
        ok.update({a: False for a in actions if a not in ok})  # a malformed name is never allowed
        return _json({"visible": ok})


def _concrete(action: str) -> bool:
    try:
        validate_subject(action)
    except SubjectError:
        return False
    return True

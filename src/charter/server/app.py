"""The FastAPI application around a Node.

Hot paths (publish) read the raw body and answer with orjson bytes: no model validation in the
way, because the envelope parser already validates strictly. Every error is
`{"error": {"code", "message", "where"}}` with the code's HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse

from charter import __version__
from charter.encoding import dumps
from charter.errors import BAD_REQUEST, CharterError
from charter.identity.registry import OPERATOR_ID, AgentRecord
from charter.identity.request_auth import verify_request
from charter.node import Node, decode_json_body
from charter.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from charter.observability.middleware import RequestIdMiddleware
from charter.server.fastlane import FastLane
from charter.units import parse_duration

log = logging.getLogger("charter.server")
JSON = "application/json"


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=JSON)


def _error(exc: CharterError) -> Response:
    return _json({"error": exc.to_dict()}, exc.http_status)


def _target(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    qs = request.scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + qs.decode("latin-1") if qs else "")


def _envelope_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["v", "id", "subject", "sender", "ts", "nonce", "kind", "payload", "sig"],
        "properties": {
            "v": {"type": "integer", "const": 1},
            "id": {"type": "string", "description": "ULID"},
            "subject": {"type": "string", "example": "agents.alpha.events"},
            "sender": {"type": "string", "description": "agent id"},
            "ts": {"type": "integer", "description": "milliseconds since the Unix epoch"},
            "nonce": {"type": "string"},
            "kind": {"type": "string", "example": "event"},
            "payload": {},
            "sig": {"type": "string", "description": "Ed25519 over the canonical JSON of the other fields"},
        },
    }


def _body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}}}}


def create_app(node: Node, *, manage_lifecycle: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await node.start()
        yield
        if manage_lifecycle:
            await node.close()

    app = FastAPI(
        title="Charter",
        version=__version__,
        description="The governed bus and control plane for a fleet of AI agents. "
        "Agent calls are signed with the agent's key; operator calls with the root key.",
        lifespan=lifespan,
        # Charter exports its own Prometheus metrics; FastAPI's OpenTelemetry hooks would only cost
        # a check on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.node = node
    # Innermost first: the hot endpoints are called straight after the request id (and, added later,
    # the dashboard guard) have run (fastlane.py).
    app.add_middleware(FastLane, fastapi=app, paths=HOT_PATHS)
    app.add_middleware(RequestIdMiddleware, access_log=node.config.daemon.access_log)

    @app.get("/metrics", tags=["daemon"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(await node.metrics.scrape(), media_type=METRICS_CONTENT_TYPE)

    @app.exception_handler(CharterError)
    async def _charter_error(request: Request, exc: CharterError) -> Response:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_params(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(CharterError(BAD_REQUEST, str(first.get("msg")), where or None))

    async def caller(request: Request, body: bytes = b"") -> AgentRecord:
        if node.is_dashboard_token(request.headers.get("authorization")):
            return node.operator  # the dashboard's login token carries operator rights
        return verify_request(
            request.headers.get("authorization"), request.method, _target(request), body,
            node.lookup, node.request_guard,
        )

    async def operator(request: Request, body: bytes = b"") -> AgentRecord:
        who = await caller(request, body)
        if who.id != OPERATOR_ID:
            raise CharterError("unauthorized", "this call is for the operator (root key) only", "authorization")
        return who

    # -- public ------------------------------------------------------------------------------

    @app.get("/v1/health", tags=["daemon"], summary="Liveness; needs no credentials")
    async def health() -> Response:
        seq, _ = await node.log.head()
        return _json({"status": "ok", "version": __version__, "head_seq": seq})

    @app.post("/v1/enroll", tags=["identity"], summary="Redeem an invite token for a charter",
              openapi_extra=_body_doc({"type": "object", "required": ["token", "name", "public_key", "ts", "proof"]}))
    async def enroll(request: Request) -> Response:
        body = decode_json_body(await request.body())
        if not isinstance(body, dict):
            raise CharterError(BAD_REQUEST, "enrolment request must be a JSON object", "body")
        return _json(await node.enroll(body), 201)

    # -- the bus -----------------------------------------------------------------------------

    @app.post("/v1/publish", tags=["bus"], summary="Publish one signed envelope",
              openapi_extra=_body_doc(_envelope_schema()))
    async def publish(request: Request) -> Response:
        receipt = await node.publish(await request.body())
        return _json(receipt.to_dict(), 201)

    @app.post("/v1/publish/batch", tags=["bus"], summary="Publish many envelopes; one durable commit",
              openapi_extra=_body_doc({"type": "array", "items": _envelope_schema()}))
    async def publish_batch(request: Request) -> Response:
        body = await request.body()
        if len(body) > node.config.bus.max_envelope_bytes * node.config.bus.max_batch:
            raise CharterError("too_large", "batch body is larger than max_batch envelopes of the maximum size")
        items = decode_json_body(body, "batch")
        if not isinstance(items, list):
            raise CharterError(BAD_REQUEST, "a batch is a JSON array of envelopes", "body")
        outcomes = await node.publish_batch(items)
        accepted = sum(1 for o in outcomes if o.receipt)
        return _json({"accepted": accepted, "rejected": len(outcomes) - accepted,
                      "results": [o.to_dict() for o in outcomes]})

    @app.get("/v1/subscribe", tags=["bus"], summary="Server-sent events: past entries from a sequence, then live ones")
    async def subscribe(request: Request, pattern: str = ">", from_seq: int | None = None,
                        consumer: str | None = None, heartbeat: str = "15s") -> Response:
        who = await caller(request)
        node.check_subscription(who, pattern)
        try:
            beat = min(max(parse_duration(heartbeat), 0.05), 60.0)
        except ValueError as exc:
            raise CharterError(BAD_REQUEST, str(exc), "heartbeat") from None
        last_id = request.headers.get("last-event-id")
        if from_seq is None and last_id and last_id.isdigit():
            from_seq = int(last_id) + 1
        if consumer:
            state = await node.open_consumer(who, consumer, pattern, from_seq)
            after = state.acked_seq
        elif from_seq is not None:
            after = max(from_seq - 1, 0)
        else:
            after = (await node.log.head())[0]

        async def events() -> AsyncIterator[bytes]:
            yield b": charter stream open\n\n"
            try:
                async for entry in node.stream(who, pattern, after, heartbeat=beat):
                    if entry is None:
                        yield b": heartbeat\n\n"
                        continue
                    yield b"id: %d\nevent: envelope\ndata: {\"seq\":%d,\"hash\":\"%s\",\"envelope\":%s}\n\n" % (
                        entry.seq, entry.seq, entry.hash.hex().encode(), entry.raw)
            except CharterError as exc:
                yield b"event: error\ndata: " + dumps(exc.to_dict()) + b"\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/v1/consumers/{name}/ack", tags=["bus"], summary="Acknowledge a durable consumer up to a sequence")
    async def ack(name: str, request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        data = decode_json_body(body)
        seq = data.get("seq") if isinstance(data, dict) else None
        if type(seq) is not int or seq < 0:
            raise CharterError(BAD_REQUEST, "body must be {\"seq\": N}", "seq")
        state = await node.log.ack(who.id, name, seq)
        return _json({"consumer": name, "pattern": state.pattern, "acked_seq": state.acked_seq})

    @app.get("/v1/events", tags=["bus"], summary="Recent entries in the caller's view")
    async def events_recent(request: Request, pattern: str = ">", limit: int = 50) -> Response:
        who = await caller(request)
        entries = await node.read_recent(who, pattern, max(1, min(limit, 5000)))
        return Response(
            b'{"events":[' + b",".join(
                b'{"seq":%d,"hash":"%s","envelope":%s}' % (e.seq, e.hash.hex().encode(), e.raw) for e in entries
            ) + b"]}",
            media_type=JSON,
        )

    # -- the agent's own things --------------------------------------------------------------

    @app.get("/v1/agent/charter", tags=["agent"], summary="The caller's current charter")
    async def my_charter(request: Request) -> Response:
        who = await caller(request)
        return _json({"charter": who.charter, "status": who.status})

    @app.post("/v1/agent/renew", tags=["agent"], summary="Renew the caller's charter before it expires")
    async def renew(request: Request) -> Response:
        who = await caller(request, await request.body())
        return _json({"charter": await node.renew(who)})

    @app.post("/v1/agent/rotate-key", tags=["agent"], summary="Replace the caller's key with a new one it holds")
    async def rotate(request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        data = decode_json_body(body)
        if not isinstance(data, dict):
            raise CharterError(BAD_REQUEST, "body must be a JSON object", "body")
        return _json({"charter": await node.rotate_key(who, data)})

    @app.get("/v1/agent/sandbox", tags=["agent"], summary="Files in the caller's sandbox, and its quota")
    async def sandbox_list(request: Request) -> Response:
        who = await caller(request)
        sb = node.sandbox(who)
        return _json({"files": sb.list(), "used_bytes": sb.usage(), "quota_bytes": sb.quota_bytes})

    @app.get("/v1/agent/sandbox/files/{path:path}", tags=["agent"], summary="Read a file in the sandbox")
    async def sandbox_read(path: str, request: Request) -> Response:
        who = await caller(request)
        return Response(node.sandbox(who).read(path), media_type="application/octet-stream")

    @app.put("/v1/agent/sandbox/files/{path:path}", tags=["agent"], summary="Write a file in the sandbox")
    async def sandbox_write(path: str, request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        used = node.sandbox(who).write(path, body)
        return _json({"path": path, "bytes": len(body), "used_bytes": used}, 201)

    @app.delete("/v1/agent/sandbox/files/{path:path}", tags=["agent"], summary="Delete a file in the sandbox")
    async def sandbox_delete(path: str, request: Request) -> Response:
        who = await caller(request)
        node.sandbox(who).delete(path)
        return _json({"deleted": path})

    # -- operator ----------------------------------------------------------------------------

    @app.get("/v1/admin/status", tags=["operator"], summary="What the daemon is and holds")
    async def status(request: Request) -> Response:
        await operator(request)
        return _json(await node.status())

    @app.post("/v1/admin/invites", tags=["operator"], summary="Create an invite token for a role",
              openapi_extra=_body_doc({"type": "object", "required": ["role"], "properties": {
                  "role": {"type": "string"}, "ttl": {"type": "string", "example": "15m"},
                  "uses": {"type": "integer", "default": 1}, "note": {"type": "string"}}}))
    async def invite(request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        data = decode_json_body(body)
        if not isinstance(data, dict) or not isinstance(data.get("role"), str):
            raise CharterError(BAD_REQUEST, "body must be {\"role\": ..., \"ttl\": \"15m\", \"uses\": 1}", "role")
        try:
            ttl = parse_duration(data["ttl"]) if data.get("ttl") is not None else None
        except ValueError as exc:
            raise CharterError(BAD_REQUEST, str(exc), "ttl") from None
        uses = data.get("uses", 1)
        if type(uses) is not int:
            raise CharterError(BAD_REQUEST, "uses must be an integer", "uses")
        token, inv = await node.create_invite(data["role"], ttl, uses, str(data.get("note", "")))
        return _json({"token": token, "invite": inv.to_dict()}, 201)

    @app.get("/v1/admin/invites", tags=["operator"], summary="Invites and their state (never the token)")
    async def invites(request: Request) -> Response:
        await operator(request)
        return _json({"invites": [i.to_dict() for i in node.registry.invites()]})

    @app.delete("/v1/admin/invites/{invite_id}", tags=["operator"], summary="Revoke an unused invite")
    async def invite_revoke(invite_id: str, request: Request) -> Response:
        await operator(request)
        await node.revoke_invite(invite_id)
        return _json({"revoked": invite_id})

    @app.get("/v1/admin/agents", tags=["operator"], summary="Every enrolled agent")
    async def agents(request: Request) -> Response:
        await operator(request)
        return _json({"agents": [a.to_dict() for a in node.registry.all()]})

    @app.get("/v1/admin/agents/{ref}", tags=["operator"], summary="One agent, by id or name, with its charter")
    async def agent_show(ref: str, request: Request) -> Response:
        await operator(request)
        rec = node.registry.find(ref)
        sb = node.sandbox(rec)
        return _json({**rec.to_dict(), "charter": rec.charter, "sandbox_used_bytes": sb.usage()})

    @app.post("/v1/admin/agents/{ref}/{action}", tags=["operator"], summary="suspend, resume, revoke or renew an agent")
    async def agent_action(ref: str, action: str, request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        if action not in ("suspend", "resume", "revoke", "renew"):
            raise CharterError("not_found", f"unknown action {action!r}; use suspend, resume, revoke or renew", "action")
        if action == "renew":
            await node.renew(node.registry.find(ref), by_operator=True)
            return _json(node.registry.find(ref).to_dict())
        data = decode_json_body(body) if body else {}
        reason = str(data.get("reason", "")) if isinstance(data, dict) else ""
        rec = await node.set_status(ref, action, reason)
        return _json(rec.to_dict())

    from charter.server.governance_routes import add_governance_routes

    add_governance_routes(app, node, caller, operator)

    from charter.server.capsule_routes import add_capsule_routes

    add_capsule_routes(app, node, caller, operator)

    from charter.server.supervisor_routes import add_supervisor_routes

    add_supervisor_routes(app, node, caller, operator)  # /v1/admin/services (docs/supervisor.md)

    from charter.server.archive_routes import add_archive_routes

    add_archive_routes(app, node, operator)

    from charter.server.gateway_routes import add_gateway_routes

    add_gateway_routes(app, node, node.gateway)

    from charter.server.dashboard_routes import add_dashboard_routes

    add_dashboard_routes(app, node)  # /dashboard (static, no build) and the guard on its token's calls

    from charter.server.delegation_routes import add_delegation_routes

    add_delegation_routes(app, node, caller)

    from charter.server.nats_routes import add_nats_routes

    add_nats_routes(app, node, caller)  # /v1/agent/nats: the caller's NATS user JWT (docs/nats.md)

    from charter.mcp.http import add_mcp_routes

    add_mcp_routes(app, node, caller)  # /mcp (streamable HTTP, bearer key) and the policy routes MCP uses

    @app.post("/v1/agent/api-key", tags=["agent"], summary="Replace the caller's bearer key for OpenAI/Ollama clients")
    async def api_key(request: Request) -> Response:
        who = await caller(request, await request.body())
        return _json({"api_key": await node.new_api_key(who)}, 201)

    hot_routes_first(app)
    return app


# Paths every agent hits all the time. FastLane calls their endpoints without the router; for any
# request it passes down (another method, say), Starlette tries routes in order, one regex each,
# and with ~100 routes these were tried last.
HOT_PATHS = ("/v1/chat/completions", "/api/chat", "/v1/publish", "/v1/publish/batch", "/api/generate",
             "/v1/embeddings", "/api/embed", "/v1/health", "/v1/agent/act")


def hot_routes_first(app: FastAPI) -> None:
    """Move the hot, parameter-free paths to the front; every other route keeps its order."""
    rank = {path: i for i, path in enumerate(HOT_PATHS)}
    app.router.routes.sort(key=lambda r: rank.get(getattr(r, "path", None), len(rank)))

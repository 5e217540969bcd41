"""Routes for capsules (agent and operator) and reflection (operator)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from charter.encoding import dumps
from charter.errors import BAD_REQUEST, NOT_FOUND, CharterError
from charter.identity.registry import AgentRecord
from charter.node import Node, decode_json_body
from charter.reflect.engine import acknowledge, reflect

Auth = Callable[..., Awaitable[AgentRecord]]


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def add_capsule_routes(app: FastAPI, node: Node, caller: Auth, operator: Auth) -> None:
    @app.get("/v1/agent/capsule", tags=["capsules"], summary="The caller's own capsule, limited to its view")
    async def my_capsule(request: Request, name: str = "AGENT") -> Response:
        who = await caller(request)
        if who.id == "operator":
            raise CharterError(BAD_REQUEST, "the operator's capsule is AI_ALIGNMENT: GET /v1/admin/capsules/show", "agent")
        spec = node.capsules.specs.get(name)
        if spec is None or spec.scope != "agent":  # a global capsule shows more than the agent's view
            per_agent = sorted(n for n, s in node.capsules.specs.items() if s.scope == "agent")
            raise CharterError(NOT_FOUND, f"no per-agent capsule {name!r}; yours: {', '.join(per_agent)}", "name")
        return _json(await node.capsules.build(name, who))

    @app.get("/v1/admin/capsules", tags=["capsules"], summary="Capsules on disk and how old they are")
    async def capsules(request: Request) -> Response:
        await operator(request)
        return _json({"capsules": node.capsules.list(), "specs": sorted(node.capsules.specs),
                      "freshness": node.capsules.freshness()})

    @app.post("/v1/admin/capsules/build", tags=["capsules"], summary="Build a capsule now: {name, agent?}")
    async def build(request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        data = decode_json_body(body) if body else {}
        if not isinstance(data, dict):
            raise CharterError(BAD_REQUEST, "body must be a JSON object", "body")
        agent = node.registry.find(str(data["agent"])) if data.get("agent") else None
        name = str(data.get("name") or ("AGENT" if agent else "AI_ALIGNMENT"))
        return _json(await node.capsules.build(name, agent), 201)

    @app.get("/v1/admin/capsules/show", tags=["capsules"], summary="The latest build of a capsule")
    async def show(request: Request, name: str = "AI_ALIGNMENT", agent: str | None = None) -> Response:
        await operator(request)
        base = node.capsules.dir / "agents" / node.registry.find(agent).name if agent else node.capsules.dir
        path = base / f"{name}_LATEST.md"
        if not path.exists():
            raise CharterError(NOT_FOUND, f"{name} has not been built yet; build it first", "name")
        return _json({"path": str(path), "markdown": path.read_text(encoding="utf-8")})

    @app.get("/v1/admin/reflect", tags=["reflect"], summary="Check every truth now; the standing contradictions")
    async def reflection(request: Request) -> Response:
        await operator(request)
        return _json(await reflect(node))

    @app.post("/v1/admin/reflect/ack", tags=["reflect"],
              summary="Acknowledge an unapproved T3 action that ran: {seq, note}; an operator-signed event")
    async def acknowledge_t3(request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        data = decode_json_body(body) if body else {}
        if not isinstance(data, dict):
            raise CharterError(BAD_REQUEST, "body must be a JSON object {seq, note}", "body")
        seq = data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise CharterError(BAD_REQUEST, f"seq must be the log sequence number of the action, got {seq!r}", "seq")
        return _json(await acknowledge(node, seq, data.get("note", "")), 201)

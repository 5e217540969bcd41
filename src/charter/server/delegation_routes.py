"""Routes for sub-agents: an enrolled agent enrols narrower agents of its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from charter.encoding import dumps
from charter.errors import BAD_REQUEST, CharterError
from charter.identity.registry import OPERATOR_ID, AgentRecord
from charter.node import Node, decode_json_body

Auth = Callable[..., Awaitable[AgentRecord]]


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def add_delegation_routes(app: FastAPI, node: Node, caller: Auth) -> None:
    @app.post("/v1/agent/subagents", tags=["agent"],
              summary="Enrol a sub-agent: at most the caller's scopes, tier, budget and expiry (policy action agents.delegate)")
    async def enroll_subagent(request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        if who.id == OPERATOR_ID:
            raise CharterError(BAD_REQUEST, "the operator invites agents (POST /v1/admin/invites); sub-agents "
                               "are enrolled by an agent", "agent")
        data = decode_json_body(body)
        if not isinstance(data, dict):
            raise CharterError(BAD_REQUEST, "body must be a JSON object", "body")
        return _json(await node.enroll_subagent(who, data), 201)

    @app.get("/v1/agent/subagents", tags=["agent"], summary="The caller's sub-agents")
    async def subagents(request: Request) -> Response:
        who = await caller(request)
        return _json({"subagents": [a.to_dict() for a in node.registry.children(who.id)]})

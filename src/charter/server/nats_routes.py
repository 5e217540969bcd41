"""`GET /v1/agent/nats`: the caller's NATS user JWT (docs/nats.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response

from charter.encoding import canonical

JSON = "application/json"


def add_nats_routes(app: FastAPI, node: Any, caller: Callable[..., Awaitable[Any]]) -> None:
    @app.get("/v1/agent/nats", tags=["agent"],
             summary="The caller's NATS user JWT: its scopes as publish/subscribe permissions (nats_agents)")
    async def nats_credentials(request: Request) -> Response:
        who = await caller(request)
        return Response(canonical(node.nats.issue(who)), media_type=JSON)

"""Operator routes for the supervisor: services listed, checked, restarted, stopped, started, their history."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from charter.encoding import dumps
from charter.errors import BAD_REQUEST, CharterError
from charter.identity.registry import AgentRecord
from charter.node import Node

Auth = Callable[..., Awaitable[AgentRecord]]
JSON = "application/json"
KINDS = ("state", "restart", "alert", "check")


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=JSON)


def add_supervisor_routes(app: FastAPI, node: Node, caller: Auth, operator: Auth) -> None:
    sup = node.supervisor

    @app.get("/v1/admin/services", tags=["operator"], summary="Every supervised service: state, last check, uptime")
    async def services(request: Request) -> Response:
        await operator(request)
        return _json({"services": await sup.list(), "enabled": sup.config.enabled})

    @app.post("/v1/admin/services/reload", tags=["operator"],
              summary="Re-read [[services]] and CHARTER_HOME/services/*.toml; start new, stop removed services")
    async def reload(request: Request) -> Response:
        await operator(request, await request.body())
        from charter.supervisor.specs import load_specs

        config = node.home.load_config()
        specs = load_specs(node.home, config)
        managed = {n: b.managed_service for n, b in config.models.backends.items() if b.managed_service}
        return _json(await sup.reload(specs, managed))

    @app.get("/v1/admin/services/{label}", tags=["operator"], summary="One service")
    async def service(label: str, request: Request) -> Response:
        await operator(request)
        views = [v for v in await sup.list() if v["label"] == label]
        if not views:
            sup.get(label)  # raises not_found with the message
        return _json(views[0])

    @app.get("/v1/admin/services/{label}/history", tags=["operator"],
             summary="State changes, restarts, alerts and check results, newest first; uptime")
    async def history(label: str, request: Request, limit: int = 50, kind: str | None = None) -> Response:
        await operator(request)
        kinds = tuple(k for k in (kind or "").split(",") if k) or None
        if kinds and any(k not in KINDS for k in kinds):
            raise CharterError(BAD_REQUEST, f"kind is a comma-separated list of {', '.join(KINDS)}", "kind")
        await sup.flush()
        return _json(await sup.history_of(label, max(1, min(limit, 10_000)), kinds))

    @app.post("/v1/admin/services/{label}/{action}", tags=["operator"],
              summary="check (now), restart (clears `failed`), reset (clears `failed` and the start limit, "
                      "no restart), stop or start (processes Charter runs)")
    async def act(label: str, action: str, request: Request) -> Response:
        await operator(request, await request.body())
        if action == "check":
            return _json(await sup.check(label))
        if action == "restart":
            return _json(await sup.restart(label))
        if action == "reset":
            return _json(await sup.reset(label))
        if action == "stop":
            return _json(await sup.stop(label))
        if action == "start":
            return _json(await sup.start_service(label))
        raise CharterError("not_found", f"unknown action {action!r}; use check, restart, reset, stop or start", "action")

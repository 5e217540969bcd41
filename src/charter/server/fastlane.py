"""The hot endpoints called straight from the middleware stack, skipping Starlette's router.

Every model call and every publish goes through one of a handful of paths. Through FastAPI each
request also pays for the route table's regexes, the exception middleware, the dependency solver
and the request/response wrappers: on the gateway's path that was about as much CPU as the policy
decision and the signed call event together. Those endpoints take nothing but the `Request` (or
nothing at all), so `FastLane`, a pure-ASGI middleware placed innermost (after the request id and
the dashboard guard), calls them itself: the same functions, the same exception handlers (looked up
by the exception's class as Starlette does), the same responses. Anything else, and any method or
path not in the table, goes down the normal stack; an exception without a handler goes up to
Starlette's server-error middleware as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute

Endpoint = Callable[..., Awaitable[Any]]


def fast_routes(app: FastAPI, paths: Iterable[str]) -> dict[tuple[str, str], tuple[Endpoint, bool]]:
    """(method, path) -> (endpoint, takes_request) for the given paths whose endpoint takes only a
    `request` (or no argument) and has no dependencies; others stay with the router."""
    wanted = set(paths)
    table: dict[tuple[str, str], tuple[Endpoint, bool]] = {}
    for route in app.router.routes:
        if not isinstance(route, APIRoute) or route.path not in wanted or route.dependencies:
            continue
        params = list(inspect.signature(route.endpoint).parameters.values())
        if not inspect.iscoroutinefunction(route.endpoint):
            continue
        if params and (len(params) > 1 or params[0].name != "request"):
            continue
        for method in route.methods:
            table.setdefault((method, route.path), (route.endpoint, bool(params)))
    return table


class FastLane:
    def __init__(self, app: Any, *, fastapi: FastAPI, paths: Iterable[str]) -> None:
        self.app = app
        self.fastapi = fastapi
        self.paths = tuple(paths)
        self.routes: dict[tuple[str, str], tuple[Endpoint, bool]] | None = None  # built on the first request

    def _handler(self, exc: Exception) -> Callable[[Request, Exception], Awaitable[Any]] | None:
        handlers = self.fastapi.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return handlers[cls]  # type: ignore[return-value]
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.routes is None:  # every route is registered by the time requests arrive
                self.routes = fast_routes(self.fastapi, self.paths)
            hit = self.routes.get((scope["method"], scope["path"]))
            if hit is not None:
                endpoint, takes_request = hit
                request = Request(scope, receive, send)
                try:
                    response = await (endpoint(request) if takes_request else endpoint())
                except Exception as exc:
                    handler = self._handler(exc)
                    if handler is None:
                        raise
                    response = await handler(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

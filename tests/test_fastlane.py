"""FastLane: the hot endpoints called without the router answer exactly as through it.

A small FastAPI app with Charter's middleware order (FastLane innermost, the request id outside it)
and the daemon's own error handler, served by a real uvicorn on a loopback port.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from charter.errors import CharterError
from charter.observability.middleware import RequestIdMiddleware
from charter.server.fastlane import FastLane, fast_routes

pytestmark = pytest.mark.anyio
HOT = ("/hot", "/hot/none", "/hot/boom", "/hot/params", "/hot/charter")


def make_app(seen: list[str]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(FastLane, fastapi=app, paths=HOT)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(CharterError)
    async def charter_error(request: Request, exc: CharterError) -> Response:
        return JSONResponse({"error": exc.to_dict()}, status_code=409)

    @app.post("/hot")
    async def hot(request: Request) -> Response:
        seen.append("route" if "route" in request.scope else "fastlane")
        return JSONResponse({"body": (await request.body()).decode(), "q": request.query_params.get("q")})

    @app.get("/hot/none")
    async def hot_none() -> Response:
        seen.append("none")
        return JSONResponse({"ok": True})

    @app.post("/hot/charter")
    async def hot_charter(request: Request) -> Response:
        raise CharterError("conflict", "already there", "name")

    @app.post("/hot/boom")
    async def hot_boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    @app.get("/hot/params")
    async def hot_params(request: Request, n: int) -> Response:  # needs the dependency solver: the router's
        seen.append("route" if "route" in request.scope else "fastlane")
        return JSONResponse({"n": n})

    return app


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(seen), host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    await task


async def test_hot_endpoints_skip_the_router_and_answer_the_same(served: tuple[str, list[str]]) -> None:
    url, seen = served
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/hot?q=1", data=b"payload", headers={"X-Request-Id": "abc-1"}) as r:
            assert r.status == 200 and await r.json() == {"body": "payload", "q": "1"}
            assert r.headers["x-request-id"] == "abc-1"  # the request id middleware still wraps it
        async with http.get(f"{url}/hot/none") as r:
            assert r.status == 200 and await r.json() == {"ok": True}
        async with http.post(f"{url}/hot/charter") as r:  # the app's own exception handler
            assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
            assert r.headers["x-request-id"]
        async with http.post(f"{url}/hot/boom") as r:  # no handler: Starlette's 500, as before
            assert r.status == 500
        async with http.get(f"{url}/hot") as r:  # another method: down to the router, which says 405
            assert r.status == 405
        async with http.get(f"{url}/hot/params?n=3") as r:  # needs the solver: the router serves it
            assert r.status == 200 and await r.json() == {"n": 3}
        async with http.get(f"{url}/hot/params?n=x") as r:
            assert r.status == 422
    assert seen == ["fastlane", "none", "route"]


def test_only_request_only_endpoints_are_taken() -> None:
    table = fast_routes(make_app([]), HOT)
    assert set(table) == {("POST", "/hot"), ("GET", "/hot/none"), ("POST", "/hot/charter"), ("POST", "/hot/boom")}

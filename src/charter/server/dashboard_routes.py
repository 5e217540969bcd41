"""The dashboard: static files (no build step) served at `/dashboard`, and the guard around its calls.

The page logs in with the token that `charter up` prints (`/dashboard#token=chd_...`): the fragment
never reaches a server, the page keeps the token in sessionStorage and sends it as
`Authorization: Bearer` on every call. No cookie is ever set, so a forged cross-site request has no
credential to ride on. On top of that, defence in depth:

- strict headers on the page (Content-Security-Policy `default-src 'self'`, no framing, no referrer);
- a request that carries a dashboard token, or asks for the page itself, is refused (403,
  `forbidden_origin`) when its `Origin` is not the daemon's own, and when its `Host` is not a loopback
  name or the configured `daemon.host` (a DNS-rebinding page has a foreign Host).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from charter.encoding import dumps
from charter.node import Node

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:
        return None


class DashboardGuard:
    """Pure ASGI (streams pass through untouched): refuse dashboard calls from foreign origins."""

    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.hosts = LOOPBACK | {node.config.daemon.host.lower()}

    def refusal(self, scope: dict[str, Any]) -> str | None:
        path: str = scope.get("path", "")
        headers = scope.get("headers", ())
        auth = origin = host = None
        for name, value in headers:
            if name == b"authorization":
                auth = value
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        is_page = path == "/dashboard" or path.startswith("/dashboard/")
        if not is_page and not (auth and auth.startswith(b"Bearer chd_")):
            return None
        if host is None or _hostname(host) not in self.hosts:
            return f"the dashboard answers only on the daemon's own address, not Host {host!r}"
        if origin is not None:
            try:
                parts = urlsplit(origin)
            except ValueError:
                parts = None
            if parts is None or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                return f"requests from {origin!r} are refused: only the dashboard's own page may use its token"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            why = self.refusal(scope)
            if why is not None:
                body = dumps({"error": {"code": "forbidden_origin", "message": why, "where": "origin"}})
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"vary", b"Origin")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _file(name: str) -> Response:
    media = FILES.get(name)
    path = DASHBOARD_DIR / name
    if media is None or not path.is_file():
        return Response(dumps({"error": {"code": "not_found", "message": f"no dashboard file {name!r}"}}),
                        status_code=404, media_type="application/json", headers=HEADERS)
    return Response(path.read_bytes(), media_type=media, headers=HEADERS)


def add_dashboard_routes(app: FastAPI, node: Node) -> None:
    app.add_middleware(DashboardGuard, node=node)

    @app.get("/dashboard", tags=["dashboard"], summary="The operator's dashboard (log in with the token `charter up` prints)")
    async def dashboard() -> Response:
        return _file("index.html")

    @app.get("/dashboard/", include_in_schema=False)
    async def dashboard_slash() -> Response:
        return RedirectResponse("/dashboard", status_code=308)

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_file(name: str) -> Response:
        return _file(name)

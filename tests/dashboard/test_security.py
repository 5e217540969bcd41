"""The dashboard's security model over plain HTTP: what its token may do, strict headers, no cookies,
foreign origins and hosts refused, a fresh token per daemon start."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator

import aiohttp
import pytest

from charter.server.daemon import dashboard_token, stop
from tests.conftest import Daemon, make_home, start_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(daemon: Daemon, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {dashboard_token(daemon.home)}", **extra}


async def test_the_page_and_its_files_are_served_with_strict_headers(shared_daemon: Daemon, http) -> None:
    url = shared_daemon.url
    async with http.get(f"{url}/dashboard") as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "Set-Cookie" not in r.headers
    assert '<script src="/dashboard/app.js"' in html and "http://" not in html and "https://" not in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        async with http.get(f"{url}/dashboard/{name}") as r:
            assert r.status == 200 and r.content_type == kind, name
            body = await r.text()
            assert dashboard_token(shared_daemon.home) not in body  # the token only ever travels in the fragment
            # Everything is local: no CDN, no external font, no remote script.
            assert "https://" not in body and "@import" not in body and "url(http" not in body, name
    async with http.get(f"{url}/dashboard/", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/dashboard"
    for bad in ("nope.js", "..%2F..%2Fapp.py", "%2e%2e%2fdaemon.py", "dashboard_routes.py"):
        async with http.get(f"{url}/dashboard/{bad}") as r:
            assert r.status == 404, bad


async def test_the_token_has_operator_rights_and_nothing_without_it(shared_daemon: Daemon, http) -> None:
    url, auth = shared_daemon.url, bearer(shared_daemon)
    for path in ("/v1/admin/status", "/v1/admin/agents", "/v1/admin/approvals?state=pending", "/v1/admin/budget",
                 "/v1/admin/budget/history?by=day", "/v1/admin/budget/history?by=model", "/v1/admin/models",
                 "/v1/admin/invites", "/v1/events?pattern=%3E&limit=5"):
        async with http.get(url + path, headers=auth) as r:
            assert r.status == 200, (path, await r.text())
            assert "Set-Cookie" not in r.headers
        async with http.get(url + path) as r:
            assert r.status == 401, path
        async with http.get(url + path, headers={"Authorization": "Bearer chd_wrong"}) as r:
            assert r.status == 401, path
    # The live stream, with the token as a header (what the page's fetch() sends).
    async with http.get(f"{url}/v1/subscribe?pattern=%3E&from_seq=1&heartbeat=1s", headers=auth) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        frame = b""
        while b"event: envelope" not in frame:
            frame += await r.content.readuntil(b"\n\n")
        data = json.loads(frame.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        assert data["seq"] == 1 and data["envelope"]["subject"] == "charter.daemon.started"


async def test_foreign_origins_and_hosts_are_refused(shared_daemon: Daemon, http) -> None:
    url = shared_daemon.url
    port = url.rsplit(":", 1)[1]
    own = {"Origin": url}
    for headers in (own, {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}, {}):
        async with http.get(f"{url}/v1/admin/status", headers=bearer(shared_daemon, **headers)) as r:
            assert r.status == 200, headers
    refused = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{int(port) + 1}"},  # another port is another origin
        {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"},  # DNS rebinding
        {"Host": f"evil.example:{port}"},
    ]
    for headers in refused:
        for method, path, body in (("GET", "/v1/admin/status", None), ("GET", "/v1/subscribe?pattern=%3E", None),
                                   ("POST", "/v1/admin/agents/nobody/suspend", {}),
                                   ("POST", "/v1/admin/approvals/apr_x/decide", {"verdict": "approve"})):
            async with http.request(method, url + path, headers=bearer(shared_daemon, **headers), json=body) as r:
                assert r.status == 403, (headers, path)
                err = (await r.json())["error"]
                assert err["code"] == "forbidden_origin" and err["where"] == "origin"
    async with http.get(f"{url}/dashboard", headers={"Host": f"evil.example:{port}"}) as r:
        assert r.status == 403
    # Calls that don't use the dashboard's token are not its business (agents sign their own).
    async with http.get(f"{url}/v1/health", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 200
    # No CORS grant for anyone: a browser's preflight from another origin gets nothing back.
    async with http.options(f"{url}/v1/admin/status", headers={
            "Origin": url, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_each_daemon_start_makes_a_new_token(tmp_path) -> None:
    home = make_home(tmp_path / "home")
    daemon = start_daemon(home)
    try:
        first = dashboard_token(home)
        path = home.run_dir / "dashboard.token"
        assert first and first.startswith("chd_") and len(first) >= 36
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        stop(home)
    daemon = start_daemon(home)
    try:
        second = dashboard_token(home)
        assert second != first
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{daemon.url}/v1/admin/status", headers={"Authorization": f"Bearer {first}"}) as r:
                assert r.status == 401
            async with http.get(f"{daemon.url}/v1/admin/status", headers={"Authorization": f"Bearer {second}"}) as r:
                assert r.status == 200
    finally:
        stop(home)

"""A pure-ASGI middleware (cheap enough for the publish hot path): a request id for every request.

The id comes from the client's `X-Request-Id` when it is sane, else a new one; it is echoed in the
response header, set in a context variable (events the request causes carry it), and written in the
access log line (JSON with `daemon.log_format = "json"`). Access lines for successful requests are
logged only with `daemon.access_log = true`; errors always are.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from charter.observability.context import new_request_id, request_id

log = logging.getLogger("charter.access")
_SANE = re.compile(rb"[A-Za-z0-9_.-]{1,64}")


class RequestIdMiddleware:
    def __init__(self, app: Any, *, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id" and _SANE.fullmatch(value):
                rid = value.decode()
                break
        rid = rid or new_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 0
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
            if status >= 400 or self.access_log:
                ms = (time.perf_counter() - started) * 1000
                log.info("%s %s %s %.2fms", scope["method"], scope["path"], status, ms,
                         extra={"fields": {"request_id": rid, "method": scope["method"], "path": scope["path"],
                                           "status": status, "ms": round(ms, 3)}})

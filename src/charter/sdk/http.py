"""A small signed HTTP client on aiohttp, shared by the SDK and the operator CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from yarl import URL

from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.identity.request_auth import sign_request
from charter.keepalive import STALE_ERRORS, ReuseProbe, reuse_trace

UNREACHABLE = "unreachable"
TIMEOUT = "timeout"


class SignedClient:
    def __init__(self, base_url: str, signer: str | None = None, key: SigningKey | None = None,
                 *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.signer, self.key = signer, key
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, json_serialize=lambda o: orjson.dumps(o).decode(),
                # Idle connections are dropped well before the daemon's keep-alive (75 s) drops them.
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
                trace_configs=[reuse_trace()],
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _prepare(self, method: str, path: str, params: dict[str, Any] | None, body: bytes, signed: bool
                 ) -> tuple[URL, dict[str, str]]:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        target = path + ("?" + urlencode(query) if query else "")
        headers = {"Content-Type": "application/json"} if body else {}
        if signed:
            if not (self.signer and self.key):
                raise CharterError("unauthorized", "this call needs credentials", "credentials")
            headers["Authorization"] = sign_request(self.key, self.signer, method, target, body)
        return URL(self.base_url + target, encoded=True), headers

    async def call(self, method: str, path: str, *, json: Any = None, body: bytes | None = None,
                   params: dict[str, Any] | None = None, signed: bool = True, raw: bool = False) -> Any:
        data = body if body is not None else (orjson.dumps(json) if json is not None else b"")
        try:
            for attempt in (1, 2):
                # Signed afresh on the retry: a request signature is good for one request only.
                url, headers = self._prepare(method, path, params, data, signed)
                probe = ReuseProbe()
                try:
                    async with self.session.request(method, url, data=data or None, headers=headers,
                                                    trace_request_ctx=probe) as resp:
                        content = await resp.read()
                except STALE_ERRORS:
                    if attempt == 2 or not probe.reused:
                        raise
                    continue  # the pooled connection was stale (charter.keepalive): once more, on a fresh one
                if resp.status >= 400:
                    raise error_from(resp.status, content)
                if raw:
                    return content
                return orjson.loads(content) if content else None
            raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise CharterError(UNREACHABLE, f"cannot reach the Charter daemon at {self.base_url}: {exc}",
                               self.base_url) from None
        except TimeoutError:
            raise CharterError(TIMEOUT, f"the Charter daemon at {self.base_url} did not answer in time; "
                               "the request may still have been applied", self.base_url) from None

    async def sse(self, path: str, params: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, bytes]]:
        """(event, data) pairs from a server-sent-event stream, until the server ends it."""
        url, headers = self._prepare("GET", path, params, b"", True)
        headers["Accept"] = "text/event-stream"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)
        try:
            async with self.session.get(url, headers=headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise error_from(resp.status, await resp.read())
                event, data = "message", b""
                async for line in resp.content:
                    line = line.rstrip(b"\r\n")
                    if not line:
                        if data:
                            yield event, data
                        event, data = "message", b""
                    elif line.startswith(b"data:"):
                        data += line[5:].lstrip(b" ")
                    elif line.startswith(b"event:"):
                        event = line[6:].strip().decode()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise CharterError(UNREACHABLE, f"lost the stream from {self.base_url}: {exc}", self.base_url) from None


def error_from(status: int, content: bytes) -> CharterError:
    try:
        err = orjson.loads(content)["error"]
        exc = CharterError(err["code"], err["message"], err.get("where"))
        if err.get("details"):
            exc.details = err["details"]
        return exc
    except (ValueError, KeyError, TypeError):
        text = content[:300].decode(errors="replace")
        return CharterError("http_error", f"HTTP {status}: {text}")

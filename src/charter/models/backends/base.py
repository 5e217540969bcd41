"""What the router needs from a backend, and the streaming plumbing they share."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson
from yarl import URL

from charter.keepalive import STALE_ERRORS, ReuseProbe, reuse_trace

from charter.models.types import BackendError, ChatRequest, Final


class Backend(Protocol):
    name: str
    kind: str

    def stream(self, model: str, req: ChatRequest, *, first_token: float, idle: float,
               total: float) -> AsyncIterator[str | Final]:
        """Text pieces, then exactly one Final; raises BackendError on any failure."""

    async def embed(self, model: str, inputs: list[str], *, timeout: float) -> tuple[list[list[float]], int]: ...

    async def list_models(self) -> list[str]: ...

    async def is_loaded(self, model: str) -> bool | None:
        """True/False when the backend can tell (Ollama's /api/ps); None when it cannot."""

    async def close(self) -> None: ...


class HttpBackend:
    """What the HTTP backends share: one keep-alive aiohttp session, opened on first use."""

    def __init__(self, name: str, url: str, *, connect: float = 2.0) -> None:
        self.name, self.url = name, url.rstrip("/")
        self._connect = connect
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    def endpoint(self, path: str) -> URL:
        """The URL of `path` on this backend, parsed once (aiohttp parses a string on every call)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.url + path)
        return url

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session(self._connect)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def _reset(exc: BaseException) -> bool:
    """A connection reset or a broken pipe, however aiohttp wraps it (ClientOSError, or the OS error)."""
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return True
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno in RESET_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))


def classify_client_error(exc: BaseException) -> BackendError:
    """Turn aiohttp's zoo of exceptions into the few kinds the breaker and the events use."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendError("refused", f"connection refused or unreachable: {exc.os_error or exc}")
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError)):
        return BackendError("connect_timeout", "connect timed out")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return BackendError("disconnected", f"the backend closed the connection mid-answer ({type(exc).__name__})")
    if _reset(exc):  # the process died with our request on the wire: its kernel answers RST
        return BackendError("disconnected", f"the backend reset the connection ({type(exc).__name__}: {exc})")
    if isinstance(exc, aiohttp.ClientError):
        return BackendError("http", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return BackendError("timeout", "timed out")
    return BackendError("error", f"{type(exc).__name__}: {exc}")


def embed_answer(raw: bytes) -> dict[str, Any]:
    """An embeddings answer's JSON object; anything else is the backend's malformed answer (it
    had answered HTTP 200: it did the work), never an exception that ends the call."""
    try:
        doc = orjson.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise BackendError("malformed", f"the embeddings answer is not a JSON object: {raw[:80]!r}").after_answer(True)
    return doc


def embed_vectors(vectors: Any, count: int, tokens: Any) -> tuple[list[list[float]], int]:
    """One non-empty vector per input, and the tokens the answer says it read; else the backend's
    malformed answer, with those tokens for the budget (it had answered: it did the work)."""
    used = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0
    if not isinstance(vectors, list) or len(vectors) != count or not all(isinstance(v, list) and v for v in vectors):
        raise BackendError("malformed", "the embeddings answer does not hold one vector per input",
                           usage=reported(used, 0)).after_answer(True)
    return vectors, used


def reported(prompt_tokens: int, completion_tokens: int) -> Final | None:
    """The usage a failed answer still reported, if it reported any."""
    return Final("error", prompt_tokens, completion_tokens) if prompt_tokens or completion_tokens else None


def error_kind(status: int, message: str) -> str:
    low = message.lower()
    if "runner" in low or "unexpected eof" in low:
        return "runner_error"
    return {429: "rate_limited", 500: "server_error", 502: "bad_gateway", 503: "overloaded",
            504: "gateway_timeout", 404: "not_found", 401: "unauthorized", 403: "forbidden"}.get(status, f"http_{status}")


async def open_stream(session: aiohttp.ClientSession, url: str | URL, *, data: bytes, headers: dict[str, str],
                      first_token: float, deadline: float) -> tuple[aiohttp.ClientResponse, float]:
    """POST and wait for the response headers within the first-token timeout.

    A server that accepts the request and then says nothing (hung, SIGSTOPped, or loading a cold
    model: Ollama sends no header before the first token) must not hold the call forever. Returns
    the response and what is left of the first-token timeout for the first line.
    """
    started = time.monotonic()
    wait = min(first_token, deadline - started)
    try:
        # asyncio.timeout, not wait_for: the same TimeoutError, without a task (and a loop turn) per call
        async with asyncio.timeout(max(wait, 0.0)):
            probe = ReuseProbe()
            try:
                resp = await session.post(url, data=data, headers=headers, trace_request_ctx=probe)
            except STALE_ERRORS:
                if not probe.reused:
                    raise  # a fresh connection dropped: the backend's own failure, for the router
                # A pooled connection died with the backend (a crash, a restart) before the pool
                # noticed (see charter.keepalive); on a fresh one a dead backend reads as `refused`.
                resp = await session.post(url, data=data, headers=headers)
    except TimeoutError:
        if wait < first_token:
            raise BackendError("total_timeout", "the answer took longer than the total timeout") from None
        raise BackendError("first_token_timeout", f"no first token within {first_token:g}s") from None
    return resp, max(first_token - (time.monotonic() - started), 0.001)


DRAIN_TIMEOUT = 2.0  # seconds a finished answer's body may take to end before its connection is dropped
_draining: set[asyncio.Task[None]] = set()


def release_when_complete(resp: aiohttp.ClientResponse) -> None:
    """Give a finished answer's connection back to the pool, without making the answer wait.

    An answer is complete at its last event (`[DONE]`, `done: true`), but the end of its body (the
    chunked encoding's terminator) can arrive a moment later. Released before that, aiohttp closes
    the connection and the next call pays for a new one (measured here: ~0.2 ms of CPU per call).
    So: released now when the end is in, else by a task once it arrives (closed after DRAIN_TIMEOUT).
    """
    if resp.content.is_eof():
        resp.release()
        return
    task = asyncio.get_running_loop().create_task(_release_at_eof(resp))
    _draining.add(task)
    task.add_done_callback(_draining.discard)


async def _release_at_eof(resp: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await resp.content.wait_eof()
    except Exception:  # noqa: BLE001 - a body that never ends, or breaks: not worth a connection
        resp.close()
        return
    resp.release()


MAX_LINE = 16 * 1024 * 1024  # a streamed line (one token's JSON) never comes near this


async def read_lines(resp: aiohttp.ClientResponse, *, first_token: float, idle: float,
                     deadline: float) -> AsyncIterator[tuple[bytes, bool]]:
    """Non-empty lines of a streaming body, with the first-token, idle and total timeouts applied.

    Reads whatever has arrived (`readany`) and hands out every complete line in it before waiting
    again, so a timer is armed only when the backend has to be waited for, not once per line: a
    fast backend's whole answer often arrives in one or two reads. Each line comes with `more`:
    True when another line is already here, so a caller can pass on the text of one read at once
    (one chunk to the client, not one per token) and never hold back a token it could send.
    """
    first = True
    buf = bytearray()
    while True:
        end = buf.rfind(b"\n")
        if end >= 0:
            lines = [line for line in (raw.strip() for raw in bytes(buf[:end]).split(b"\n")) if line]
            del buf[:end + 1]
            if lines:
                first = False
                last = len(lines) - 1
                for i, line in enumerate(lines):
                    yield line, i < last
        if len(buf) > MAX_LINE:
            raise BackendError("malformed", f"a streamed line longer than {MAX_LINE} bytes")
        wait = first_token if first else idle
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendError("total_timeout", "the answer took longer than the total timeout")
        try:
            async with asyncio.timeout(min(wait, left)):  # no task per read, unlike wait_for
                chunk = await resp.content.readany()
        except TimeoutError:
            if left <= wait:
                raise BackendError("total_timeout", "the answer took longer than the total timeout") from None
            kind = "first_token_timeout" if first else "idle_timeout"
            raise BackendError(kind, f"no {'first token' if first else 'token'} within {wait:g}s") from None
        if not chunk:  # the end of the body: a last line without its newline still counts
            line = bytes(buf).strip()
            if line:
                yield line, False
            return
        buf += chunk


class StreamedBody:
    """A streamed answer's body: its lines (`read_lines`), closed on leaving the block, and the
    connection given back to the pool when the answer was `complete` (see `release_when_complete`),
    else dropped. The lines are closed here rather than left to the garbage collector, which would
    finalise them through the loop (a thread-safe wake-up and a task each)."""

    def __init__(self, resp: aiohttp.ClientResponse, *, first_token: float, idle: float, deadline: float) -> None:
        self.resp = resp
        self.lines = read_lines(resp, first_token=first_token, idle=idle, deadline=deadline)
        self.complete = False

    async def __aenter__(self) -> StreamedBody:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.lines.aclose()
        finally:
            if self.complete:
                release_when_complete(self.resp)
            else:
                self.resp.release()


def decode_event(raw: bytes, what: str) -> tuple[dict[str, Any], BackendError | None]:
    """One streamed JSON object (an NDJSON line, an SSE event's data), or the error it stands for:
    not JSON or not an object (`malformed`), or a `{"error": ...}` sent under HTTP 200."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}, BackendError("malformed", f"not a JSON {what}: {raw[:80]!r}")
    if not isinstance(obj, dict):
        return {}, BackendError("malformed", f"a stream {what} is not a JSON object")
    if "error" in obj:
        err = obj["error"]
        return obj, BackendError("midstream_error", str(err.get("message") if isinstance(err, dict) else err))
    return obj, None


async def error_body(resp: aiohttp.ClientResponse) -> BackendError:
    raw = await resp.read()
    try:
        doc = orjson.loads(raw)
        err = doc.get("error", doc)
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        msg = raw[:200].decode(errors="replace")
    return BackendError(error_kind(resp.status, str(msg)), f"HTTP {resp.status}: {msg}", status=resp.status)


def new_session(connect: float, limit: int = 256) -> aiohttp.ClientSession:
    """One backend's keep-alive session. It keeps no cookies: the session serves every agent, so a
    cookie one answer set (a cloud API's load balancer sets them) must not ride along on the next
    agent's call; and not parsing them saves a little on every call."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect, connect=connect),
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=30, enable_cleanup_closed=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        json_serialize=lambda o: orjson.dumps(o).decode(),
        trace_configs=[reuse_trace()],
    )


def options_for(req: ChatRequest) -> dict[str, Any]:
    opts: dict[str, Any] = dict(req.extra_options)
    if req.max_tokens is not None:
        opts["num_predict"] = req.max_tokens
    for key in ("temperature", "top_p", "seed"):
        v = getattr(req, key)
        if v is not None:
            opts[key] = v
    if req.stop:
        opts["stop"] = req.stop
    return opts

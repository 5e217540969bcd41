"""A stand-in Ollama server for tests and the demo: Ollama's wire format, and the ways Ollama fails.

No real Ollama can run on these machines, so this module speaks Ollama's HTTP API as Ollama does:

* native routes: `GET|HEAD /`, `/api/version`, `/api/tags`, `/api/ps`, `POST /api/show`,
  `/api/generate`, `/api/chat` (NDJSON streams by default, one object with `"stream": false`),
  `/api/embed`, the legacy `/api/embeddings`, and `/api/pull`;
* the OpenAI-compatible layer: `/v1/chat/completions`, `/v1/completions` (SSE with `data: [DONE]`,
  `stream_options.include_usage` giving a last chunk with `choices: []`), `/v1/models`,
  `/v1/models/{model}`, `/v1/embeddings` (float or base64), errors shaped
  `{"error": {"message", "type", "param", "code"}}`.

What the model "says" is deterministic. The text is a hash-seeded run of words drawn from the model
name, the prompt (or the messages) and `options.seed`; a prompt or last user message that starts
with `echo:` is answered with the rest of it verbatim; a `[[tokens=N]]` anywhere in it sets the
natural length to N tokens. Tokens are the pieces of `split_tokens` (a word or one punctuation
mark, with its leading whitespace), so `count_tokens(answer) == eval_count` and
`prompt_eval_count` is `count_tokens` summed over the prompt (generate: system + prompt, plus the
length of any `context` given; chat: every message's content). `options.num_predict` (or
`max_tokens` on `/v1`) caps the answer with `done_reason: "length"`; `options.stop` cuts it.
Each token costs `token_delay` seconds (1 ms by default), each prompt token `prompt_delay`, and a
cold model `load_delay`; the durations reported (nanoseconds) are measured, so
`total_duration >= load_duration + prompt_eval_duration + eval_duration`.

Models are "loaded" after their first use or a load request (empty prompt / messages, answered
with `done_reason: "load"`), are listed by `/api/ps` with `expires_at` and `size_vram`, and unload
when `keep_alive` runs out (default 5m; a negative value never; `keep_alive: 0` with an empty
prompt unloads at once, `done_reason: "unload"`).

Faults, set with `--fault MODE` at start or at run time with `POST /__standin/fault
{"mode": MODE, "count": N | null, ...}` (`GET /__standin/state` shows the fault, request
counts per path, and `cancelled`: requests whose client went away, whether during the load, the
prompt, the tokens or a write its client did not take, as Ollama stops a request whose client disconnects). They hit the inference routes (generate, chat, embed, embeddings and the /v1
ones); `/`, `/api/version`, `/api/tags`, `/api/ps` and `/api/show` keep answering, which is the
health lie of ollama#1378 and #18213. `exit` and `refuse` take the whole port down:

  exit                  os._exit at the next request of any kind (params: `code`, default 1)
  hang                  accept the request and never answer
  refuse                close the listening socket and drop open connections: connections are
                        refused until the fault is cleared (params: `seconds` to reopen by itself;
                        otherwise clear it through `--control-port`)
  http500               500 `{"error":"llama runner process has terminated: exit status 2"}`
  http503               503 queue full (`server busy, please try again.  maximum pending ...`)
  http429               429 `{"error":"too many requests"}`
  empty                 200, empty response/content, done true (the GPU-reset lie, #18213)
  error_midstream       `after` chunks (default 3), then the NDJSON line `{"error":"an error was
                        encountered while running the model: unexpected EOF"}` under HTTP 200 and
                        no done object; the runner is gone, so the model unloads. Not streaming:
                        500 with that error, as Ollama answers.
  slow_first_token      a cold load: the model is evicted and loading takes `seconds` (default 2),
                        during which `/api/ps` does not list it and no header or token is sent
  disconnect_midstream  `after` chunks (default 3), then the TCP connection is aborted, no done
  malformed             200 with `after` chunks (default 1) then non-JSON garbage lines
  cpu_fallback          `/api/ps` shows `size_vram: 0` and tokens come `factor` (10) times slower

Every fault takes `count` (requests it applies to, then it clears itself; null = until cleared),
`message` (replaces the error text) and `paths` (a list of route paths it is limited to).
`POST /__standin/config` changes `token_delay`, `prompt_delay`, `load_delay`, `keep_alive`;
`POST /__standin/reset` clears the fault and the counts and unloads every model. All of
`/__standin/*` is also served on `--control-port`, which stays up while the main port refuses.

Use it in-process (`StandinOllama`, `await start(host, port)` / `await stop()`) or as a real
process (`spawn_standin(...)` -> `StandinProcess` with `port`, `pid`, `kill()`, `suspend()` ...)
for tests that SIGKILL or SIGSTOP it. Command line:

  python -m charter.models.standin --port N [--models llama3.2:3b,qwen2.5:0.5b] [--fault MODE]
      [--fault-count N] [--fault-after N] [--fault-seconds S] [--control-port [N]]
      [--token-delay S] [--load-delay S] [--keep-alive DUR]

It prints one JSON line `{"event": "ready", "port": ..., "control_port": ..., "pid": ...}` on
stdout once it listens (port 0 picks a free one), logs to stderr, and stops on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "FAULT_MODES",
    "OLLAMA_VERSION",
    "StandinOllama",
    "StandinProcess",
    "count_tokens",
    "embed_text",
    "model_info",
    "parse_keep_alive",
    "spawn_standin",
    "spawn_standin_async",
    "split_tokens",
]

OLLAMA_VERSION = "0.12.6"
DEFAULT_MODELS: tuple[str, ...] = ("llama3.2:3b", "qwen2.5:0.5b")
DEFAULT_KEEP_ALIVE = 300.0  # OLLAMA_KEEP_ALIVE: 5m

FAULT_MODES: tuple[str, ...] = (
    "none",
    "exit",
    "hang",
    "refuse",
    "http500",
    "http503",
    "http429",
    "empty",
    "error_midstream",
    "slow_first_token",
    "disconnect_midstream",
    "malformed",
    "cpu_fallback",
)

RUNNER_TERMINATED = "llama runner process has terminated: exit status 2"
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
TOO_MANY_REQUESTS = "too many requests"
MIDSTREAM_EOF = "an error was encountered while running the model: unexpected EOF"
GARBAGE_LINES: tuple[str, ...] = (
    "llama_decode: failed to decode, ret = -3",
    "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>",
    '{"model":"unknown","created_at":"2024-01-01T00:00:',
)
_ERROR_STATUS = {"http500": (500, RUNNER_TERMINATED), "http503": (503, QUEUE_FULL), "http429": (429, TOO_MANY_REQUESTS)}
_MIDSTREAM = ("error_midstream", "disconnect_midstream", "malformed")

INFERENCE_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)
CONTROL_PREFIX = "/__standin/"

# --------------------------------------------------------------------------------------------
# tokens and text


_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])")
_TOKENS_DIRECTIVE = re.compile(r"\[\[tokens=(\d+)\]\]")
_VOCAB_SIZE = 128256

_WORDS = (
    "the model answers with a steady stream of plain words about light water stone river field "
    "cloud signal window garden lantern harbor meadow engine pattern shadow mountain valley "
    "forest ocean thunder silver copper amber violet quiet bright gentle rapid careful simple "
    "local gateway request answer token budget policy agent fleet ledger charter review "
    "because while after before often rarely always never under over across between within "
    "builds carries measures follows returns settles holds keeps moves turns opens closes"
).split()


def split_tokens(text: str) -> list[str]:
    """The stand-in's tokens: each word or punctuation mark with the whitespace before it.

    `"".join(split_tokens(t)) == t` for any text without trailing whitespace.
    """
    return _PIECE.findall(text or "")


def count_tokens(text: str) -> int:
    """How many tokens the stand-in counts in `text` (prompt_eval_count / eval_count)."""
    return len(_PIECE.findall(text or ""))


def _token_id(piece: str) -> int:
    return int.from_bytes(hashlib.sha256(piece.strip().encode()).digest()[:4], "big") % _VOCAB_SIZE


def _compose(seed: bytes, n_tokens: int) -> list[str]:
    """A deterministic answer of exactly `n_tokens` pieces: sentences of words ending in '.'."""
    rng = random.Random(hashlib.sha256(seed).digest())
    if n_tokens <= 0:
        return []
    if n_tokens == 1:
        return [rng.choice(_WORDS).capitalize()]
    pieces: list[str] = []
    sentence_start = True
    until_stop = rng.randint(6, 14)
    while len(pieces) < n_tokens - 1:
        word = rng.choice(_WORDS)
        if sentence_start:
            word = word.capitalize()
        pieces.append(word if not pieces else " " + word)
        sentence_start = False
        until_stop -= 1
        if until_stop == 0 and len(pieces) < n_tokens - 2:
            pieces.append(".")
            sentence_start = True
            until_stop = rng.randint(6, 14)
    pieces.append(".")
    return pieces


# --------------------------------------------------------------------------------------------
# embeddings


@functools.lru_cache(maxsize=8192)
def _token_vector(model: str, token: str, dim: int) -> tuple[float, ...]:
    rng = random.Random(hashlib.sha256(f"{model}\0{token}".encode()).digest())
    return tuple(rng.gauss(0.0, 1.0) for _ in range(dim))


def embed_text(model: str, text: str, dim: int) -> list[float]:
    """A deterministic unit vector: the normalised sum of per-token vectors (bag of words).

    Texts sharing words are closer in cosine than unrelated ones, which is enough for a demo.
    """
    tokens = [p.strip().lower() for p in split_tokens(text)] or [""]
    acc = [0.0] * dim
    for tok in tokens:
        vec = _token_vector(model, tok, dim)
        acc = [a + b for a, b in zip(acc, vec, strict=True)]
    norm = math.sqrt(sum(x * x for x in acc)) or 1.0
    # float32, as Ollama's vectors are
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(x / norm for x in acc))))


# --------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    family: str
    parameter_size: str
    parameter_count: int
    quantization_level: str
    size: int
    digest: str
    modified_at: str
    embedding_length: int
    context_length: int
    capabilities: tuple[str, ...]

    @property
    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    @property
    def generates(self) -> bool:
        return "completion" in self.capabilities


# name -> family, parameter_size, parameter_count, quantization, size bytes, embedding, context, capabilities
_GEN = ("completion", "tools")
_EMB = ("embedding",)
_KNOWN: dict[str, tuple[str, str, int, str, int, int, int, tuple[str, ...]]] = {
    "llama3.2:3b": ("llama", "3.2B", 3212749888, "Q4_K_M", 2019393189, 3072, 131072, _GEN),
    "llama3.2:latest": ("llama", "3.2B", 3212749888, "Q4_K_M", 2019393189, 3072, 131072, _GEN),
    "llama3.2:1b": ("llama", "1.2B", 1235814432, "Q8_0", 1321098329, 2048, 131072, _GEN),
    "llama3.1:8b": ("llama", "8.0B", 8030261312, "Q4_K_M", 4920753328, 4096, 131072, _GEN),
    "qwen2.5:0.5b": ("qwen2", "494.03M", 494032768, "Q4_K_M", 397821319, 896, 32768, _GEN),
    "qwen2.5:1.5b": ("qwen2", "1.5B", 1543714304, "Q4_K_M", 986061892, 1536, 32768, _GEN),
    "qwen2.5:7b": ("qwen2", "7.6B", 7615616512, "Q4_K_M", 4683087332, 3584, 32768, _GEN),
    "mistral:latest": ("llama", "7.2B", 7248023552, "Q4_0", 4113301824, 4096, 32768, _GEN),
    "nomic-embed-text:latest": ("nomic-bert", "137M", 136727040, "F16", 274302450, 768, 2048, _EMB),
    "all-minilm:latest": ("bert", "23M", 22565376, "F16", 45960996, 384, 512, _EMB),
}


def normalize_name(name: str) -> str:
    """Ollama's short name: a missing tag means `:latest`."""
    name = (name or "").strip()
    if name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def _iso(dt: datetime) -> str:
    """RFC 3339 with nanoseconds and trailing zeros trimmed, as Go's time.Time marshals."""
    dt = dt.astimezone(timezone.utc)
    frac = f"{dt.microsecond:06d}000".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def _now_iso() -> str:
    ns = time.time_ns()
    dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc)
    frac = f"{ns % 1_000_000_000:09d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def model_info(name: str) -> ModelInfo:
    """Metadata for a model name: real figures for common models, plausible ones otherwise."""
    name = normalize_name(name)
    h = hashlib.sha256(name.encode()).digest()
    digest = h.hex()
    modified = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=int.from_bytes(h[:4], "big") % 20_000_000)
    if name in _KNOWN:
        fam, psize, pcount, quant, size, emb, ctx, caps = _KNOWN[name]
    else:
        base, _, tag = name.rpartition("/")[2].partition(":")
        letters = re.match(r"[a-z]+", base.lower())
        fam = letters.group(0) if letters else "model"
        m = re.search(r"(\d+(?:\.\d+)?)([bm])", tag.lower())
        if m:
            value = float(m.group(1))
            pcount = int(value * (1e9 if m.group(2) == "b" else 1e6))
            psize = f"{m.group(1)}{m.group(2).upper()}"
        else:
            pcount, psize = 1_000_000_000, "1B"
        embedding = "embed" in name or "minilm" in name
        caps = _EMB if embedding else _GEN
        quant = "F16" if embedding else "Q4_K_M"
        size = int(pcount * (2.0 if embedding else 0.6))
        emb = 768 if embedding else 2048
        ctx = 2048 if embedding else 32768
    return ModelInfo(name, fam, psize, pcount, quant, size, digest, _iso(modified), emb, ctx, caps)


# --------------------------------------------------------------------------------------------
# keep_alive


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """Seconds to stay loaded: a number is seconds, a string a Go duration; negative is forever."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError(f"json: cannot unmarshal bool into Go value of type api.Duration: {value}")
    if isinstance(value, int | float):
        return math.inf if value < 0 else float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid keep_alive {value!r}")
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION.match(body, pos)
        if not m:
            raise ValueError(f'time: invalid duration "{value}"')
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f'time: invalid duration "{value}"')
    return math.inf if sign < 0 else total


# --------------------------------------------------------------------------------------------
# faults and state


@dataclass(slots=True)
class Fault:
    mode: str = "none"
    remaining: int | None = None  # None: until cleared
    params: dict[str, Any] = field(default_factory=dict)
    paths: frozenset[str] | None = None
    hits: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "count": self.remaining,
            "params": dict(self.params),
            "paths": sorted(self.paths) if self.paths is not None else None,
            "hits": self.hits,
        }


@dataclass(slots=True)
class Applied:
    """The fault as it applies to one request."""

    mode: str
    params: dict[str, Any]

    def num(self, key: str, default: float) -> float:
        try:
            return float(self.params.get(key, default))
        except (TypeError, ValueError):
            return default


@dataclass(slots=True)
class Settings:
    token_delay: float = 0.001
    prompt_delay: float = 0.00002
    load_delay: float = 0.02
    keep_alive: float = DEFAULT_KEEP_ALIVE
    min_tokens: int = 8
    max_tokens: int = 32
    embed_dim: int | None = None


@dataclass(slots=True)
class Plan:
    kind: str  # "generate" | "chat" | "completion" (the /v1 one)
    model: ModelInfo
    pieces: list[str]
    eval_count: int
    done_reason: str
    prompt_tokens: int
    prompt_ids: list[int]
    keep_alive: float
    t0: int


class ApiError(Exception):
    """An error answer, rendered natively (`{"error": msg}`) or in the /v1 shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _v1_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json", charset="utf-8")


class _Chunks:
    """A streamed answer, its headers sent with the first chunk. A request cancelled while a write
    waits (its client took nothing and the socket is full) is counted as a cancelled request."""

    def __init__(self, server: Any, request: web.Request, content_type: str) -> None:
        self.server, self.request, self.content_type = server, request, content_type
        self.resp: web.StreamResponse | None = None

    async def send(self, data: bytes) -> None:
        try:
            if self.resp is None:
                self.resp = web.StreamResponse(status=200, headers={"Content-Type": self.content_type})
                await self.resp.prepare(self.request)
            await self.resp.write(data)
        except asyncio.CancelledError:
            self.server.cancelled += 1
            raise


def _line(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


_FAULT_KEY: web.RequestKey[Applied | None] = web.RequestKey("standin_fault")


def _now_ns() -> int:
    return time.perf_counter_ns()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class StandinOllama:
    """The stand-in server. `await start(host, port)` returns the bound port; `await stop()`."""

    def __init__(
        self,
        models: Iterable[str] = DEFAULT_MODELS,
        *,
        token_delay: float = 0.001,
        prompt_delay: float = 0.00002,
        load_delay: float = 0.02,
        keep_alive: float | str = DEFAULT_KEEP_ALIVE,
        min_tokens: int = 8,
        max_tokens: int = 32,
        embed_dim: int | None = None,
        version: str = OLLAMA_VERSION,
    ) -> None:
        self.models: dict[str, ModelInfo] = {}
        for name in models:
            info = model_info(name)
            self.models[info.name] = info
        self.settings = Settings(
            token_delay=token_delay,
            prompt_delay=prompt_delay,
            load_delay=load_delay,
            keep_alive=parse_keep_alive(keep_alive),
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            embed_dim=embed_dim,
        )
        self.version = version
        self.fault = Fault()
        self.requests: Counter[str] = Counter()
        self.peers: set[tuple[str, int]] = set()  # client (address, port) pairs seen: one per connection
        self.cancelled = 0
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.control_port: int | None = None
        self._loaded: dict[str, float] = {}  # name -> monotonic expiry (inf: forever)
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._control_runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._reopen: asyncio.TimerHandle | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def control_url(self) -> str | None:
        return None if self.control_port is None else f"http://{self.host}:{self.control_port}"

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def start(self, host: str = "127.0.0.1", port: int = 0, control_port: int | None = None) -> int:
        """Listen on host:port (0 picks a free port) and, if given, control_port; returns the port."""
        self._stopping = asyncio.Event()
        self.host = host
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._add_routes(app)
        self._add_control_routes(app)
        # Ollama's server cancels a request's context when its client disconnects, and generation
        # stops, even before the first token (ollama#1695); aiohttp does so only when asked.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5,
                                     handler_cancellation=True)
        await self._runner.setup()
        self.port = port
        await self._listen()
        if control_port is not None:
            capp = web.Application()
            self._add_control_routes(capp)
            self._control_runner = web.AppRunner(capp, access_log=None, handle_signals=False)
            await self._control_runner.setup()
            csite = web.TCPSite(self._control_runner, host, control_port, reuse_address=True)
            await csite.start()
            self.control_port = csite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.fault.mode == "refuse":
            await self._apply_refuse()
        assert self.port is not None
        return self.port

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._reopen is not None:
            self._reopen.cancel()
        for runner in (self._runner, self._control_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._control_runner = None
        self._site = None

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, self.port or 0, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._site = site

    async def _close_listener(self, keep: object = None) -> None:
        """Stop listening and drop every open connection (but `keep`, which closes by itself)."""
        site, self._site = self._site, None
        if site is not None:
            await site.stop()
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                transport = conn.transport
                if transport is not None and conn is not keep:
                    transport.abort()

    async def _apply_refuse(self, keep: object = None) -> None:
        await self._close_listener(keep)
        seconds = self.fault.params.get("seconds")
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._reopen = loop.call_later(float(seconds), lambda: asyncio.ensure_future(self._end_refuse()))

    async def _end_refuse(self) -> None:
        if self.fault.mode == "refuse":
            self.fault = Fault()
        if self._site is None and self._runner is not None:
            await self._listen()

    # ---- faults -----------------------------------------------------------------------------

    def set_fault(
        self,
        mode: str,
        count: int | None = None,
        *,
        paths: Iterable[str] | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Set the fault (synchronous part). Use `await apply_fault(...)` when a loop is running."""
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {', '.join(FAULT_MODES)}")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ValueError("count must be a positive integer or null")
        self.fault = Fault(mode, None if mode == "none" else count, dict(params), frozenset(paths) if paths else None)
        return self.fault.describe()

    async def apply_fault(self, mode: str, count: int | None = None, **params: Any) -> dict[str, Any]:
        """Set the fault and act on it now: `refuse` closes the port, anything else reopens it."""
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        described = self.set_fault(mode, count, **params)
        if self._runner is not None:
            if mode == "refuse":
                await self._apply_refuse()
            elif self._site is None:
                await self._listen()
        return described

    def _take_fault(self, path: str) -> Applied | None:
        f = self.fault
        if f.mode in ("none", "exit", "refuse") or path not in INFERENCE_PATHS:
            return None
        if f.paths is not None and path not in f.paths:
            return None
        applied = Applied(f.mode, dict(f.params))
        f.hits += 1
        if f.remaining is not None:
            f.remaining -= 1
            if f.remaining <= 0:
                self.fault = Fault()
        return applied

    def state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "port": self.port,
            "control_port": self.control_port,
            "listening": self.listening,
            "version": self.version,
            "fault": self.fault.describe(),
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "connections_seen": len(self.peers),
            "cancelled": self.cancelled,
            "models": sorted(self.models),
            "loaded": sorted(self._loaded_now()),
            "settings": {
                "token_delay": self.settings.token_delay,
                "prompt_delay": self.settings.prompt_delay,
                "load_delay": self.settings.load_delay,
                "keep_alive": None if math.isinf(self.settings.keep_alive) else self.settings.keep_alive,
            },
        }

    # ---- model load state -------------------------------------------------------------------

    def _loaded_now(self) -> dict[str, float]:
        now = time.monotonic()
        for name in [n for n, exp in self._loaded.items() if exp <= now]:
            del self._loaded[name]
        return self._loaded

    def _touch(self, name: str, keep_alive: float) -> None:
        self._loaded[name] = time.monotonic() + keep_alive if not math.isinf(keep_alive) else math.inf
        if keep_alive <= 0:
            self._loaded.pop(name, None)

    def evict(self, name: str) -> None:
        self._loaded.pop(normalize_name(name), None)

    async def _ensure_loaded(self, name: str, keep_alive: float, fault: Applied | None) -> int:
        """Load the model if it is cold; returns load_duration in ns."""
        t = _now_ns()
        delay = self.settings.load_delay
        if fault is not None and fault.mode == "slow_first_token":
            self._loaded.pop(name, None)
            delay = fault.num("seconds", 2.0)
        if name in self._loaded_now():
            self._loaded[name] = math.inf  # in use: does not expire mid-request
            return max(_now_ns() - t, 25_000)
        fut = self._loading.get(name)
        if fut is None or (fault is not None and fault.mode == "slow_first_token"):
            fut = asyncio.ensure_future(asyncio.sleep(delay))
            self._loading[name] = fut
            fut.add_done_callback(lambda _f, n=name: self._loading.pop(n, None) if self._loading.get(n) is _f else None)
        await asyncio.shield(fut)
        self._loaded[name] = math.inf
        return max(_now_ns() - t, 25_000)

    # ---- middleware -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path.startswith(CONTROL_PREFIX):
            return await handler(request)
        self.requests[path] += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer and len(self.peers) < 100_000:
            self.peers.add((peer[0], peer[1]))
        mode = self.fault.mode
        if mode == "exit":
            os._exit(int(self.fault.params.get("code", 1)))
        if mode == "refuse" or self._site is None:
            _abort(request)  # a request on a connection opened before the port closed
            return web.Response(status=500)
        fault = self._take_fault(path)
        request[_FAULT_KEY] = fault
        if fault is not None:
            if fault.mode == "hang":
                assert self._stopping is not None
                await self._stopping.wait()
                _abort(request)
                return web.Response(status=500)
            if fault.mode in _ERROR_STATUS:
                status, message = _ERROR_STATUS[fault.mode]
                message = str(fault.params.get("message") or message)
                if path.startswith("/v1/"):
                    return _json(_v1_error_body(status, message), status)
                return _json({"error": message}, status)
        try:
            return await handler(request)
        except ApiError as exc:
            if path.startswith("/v1/"):
                return _json(_v1_error_body(exc.status, exc.message), exc.status)
            return _json({"error": exc.message}, exc.status)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return web.Response(status=404, text="404 page not found")  # what gin answers for both

    # ---- routes -----------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self._root)
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps)
        r.add_post("/api/show", self._show)
        r.add_post("/api/generate", self._generate)
        r.add_post("/api/chat", self._chat)
        r.add_post("/api/embed", self._embed)
        r.add_post("/api/embeddings", self._embeddings)
        r.add_post("/api/pull", self._pull)
        r.add_post("/v1/chat/completions", self._v1_chat)
        r.add_post("/v1/completions", self._v1_completions)
        r.add_post("/v1/embeddings", self._v1_embeddings)
        r.add_get("/v1/models", self._v1_models)
        r.add_get("/v1/models/{model:.+}", self._v1_model)

    def _add_control_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post(CONTROL_PREFIX + "fault", self._ctl_fault)
        r.add_get(CONTROL_PREFIX + "state", self._ctl_state)
        r.add_post(CONTROL_PREFIX + "config", self._ctl_config)
        r.add_post(CONTROL_PREFIX + "reset", self._ctl_reset)

    # ---- control ----------------------------------------------------------------------------

    async def _ctl_fault(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            body = dict(body)
            mode = body.pop("mode", "none") or "none"
            count = body.pop("count", None)
            paths = body.pop("paths", None)
            if mode == "refuse":
                self.set_fault(mode, count, paths=paths, **body)  # validate before answering
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        if mode == "refuse":
            if self._reopen is not None:
                self._reopen.cancel()
                self._reopen = None
            # Take the port down; this request may have come through it, so its connection is
            # spared and closes once the answer is out.
            await self._apply_refuse(keep=request.protocol)
            resp = _json({"fault": self.fault.describe()})
            resp.force_close()
            return resp
        try:
            described = await self.apply_fault(mode, count, paths=paths, **body)
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        return _json({"fault": described})

    async def _ctl_state(self, request: web.Request) -> web.Response:
        return _json(self.state())

    async def _ctl_config(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            for key in ("token_delay", "prompt_delay", "load_delay"):
                if key in body:
                    setattr(self.settings, key, max(0.0, float(body[key])))
            if "keep_alive" in body:
                self.settings.keep_alive = parse_keep_alive(body["keep_alive"])
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        return _json(self.state()["settings"])

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        await self.apply_fault("none")
        self.requests.clear()
        self.peers.clear()
        self.cancelled = 0
        self._loaded.clear()
        return _json(self.state())

    # ---- simple native routes ---------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")

    async def _version(self, request: web.Request) -> web.Response:
        return _json({"version": self.version})

    def _model_entry(self, info: ModelInfo) -> dict[str, Any]:
        return {
            "name": info.name,
            "model": info.name,
            "modified_at": info.modified_at,
            "size": info.size,
            "digest": info.digest,
            "details": info.details,
        }

    async def _tags(self, request: web.Request) -> web.Response:
        return _json({"models": [self._model_entry(m) for m in self.models.values()]})

    async def _ps(self, request: web.Request) -> web.Response:
        now_mono, now_wall = time.monotonic(), datetime.now(timezone.utc)
        cpu = self.fault.mode == "cpu_fallback"
        out = []
        for name, expiry in sorted(self._loaded_now().items()):
            info = self.models.get(name) or model_info(name)
            if math.isinf(expiry):
                # In use, or kept forever: Ollama shows a far-future time.
                expires = now_wall + timedelta(days=365 * 290)
            else:
                expires = now_wall + timedelta(seconds=expiry - now_mono)
            entry = {
                "name": info.name,
                "model": info.name,
                "size": info.size,
                "digest": info.digest,
                "details": info.details,
                "expires_at": _iso(expires),
                "size_vram": 0 if cpu else info.size,
                "context_length": 4096,
            }
            out.append(entry)
        return _json({"models": out})

    async def _show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = normalize_name(str(body.get("model") or body.get("name") or ""))
        if not name:
            raise ApiError(400, "model is required")
        info = self.models.get(name)
        if info is None:
            raise ApiError(404, f"model '{name}' not found")
        fam = info.family
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}" if info.generates else "{{ .Prompt }}"
        return _json(
            {
                "license": "",
                "modelfile": (
                    '# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, '
                    f"replace FROM with:\n# FROM {info.name}\n\nFROM /root/.ollama/models/blobs/sha256-{info.digest}\n"
                    f'TEMPLATE """{template}"""\n'
                ),
                "parameters": 'stop                           "<|eot_id|>"' if info.generates else "",
                "template": template,
                "details": info.details,
                "model_info": {
                    "general.architecture": fam,
                    "general.file_type": 15,
                    "general.parameter_count": info.parameter_count,
                    "general.quantization_version": 2,
                    f"{fam}.context_length": info.context_length,
                    f"{fam}.embedding_length": info.embedding_length,
                },
                "capabilities": list(info.capabilities),
                "modified_at": info.modified_at,
            }
        )

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        name = normalize_name(str(body.get("model") or body.get("name") or ""))
        if not name:
            raise ApiError(400, "model is required")
        info = self.models.get(name) or model_info(name)
        statuses: list[dict[str, Any]] = [
            {"status": "pulling manifest"},
            {"status": f"pulling {info.digest[:12]}", "digest": f"sha256:{info.digest}", "total": info.size},
            {
                "status": f"pulling {info.digest[:12]}",
                "digest": f"sha256:{info.digest}",
                "total": info.size,
                "completed": info.size,
            },
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        self.models[info.name] = info
        if body.get("stream") is False:
            return _json({"status": "success"})
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for s in statuses:
            await resp.write(_line(s))
        return resp

    # ---- request parsing --------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            raise ApiError(400, "missing request body" if not request.path.startswith("/v1/") else "EOF")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"invalid character in request body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "json: cannot unmarshal into Go value of type request")
        return body

    def _model(self, body: dict[str, Any]) -> ModelInfo:
        raw = body.get("model")
        if not isinstance(raw, str) or not raw.strip():
            raise ApiError(400, "model is required")
        name = normalize_name(raw)
        info = self.models.get(name)
        if info is None:
            raise ApiError(404, f'model "{raw.strip()}" not found, try pulling it first')
        return info

    def _keep_alive(self, body: dict[str, Any]) -> float:
        try:
            return parse_keep_alive(body.get("keep_alive"), self.settings.keep_alive)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    # ---- planning the answer ----------------------------------------------------------------

    def _plan(
        self,
        kind: str,
        info: ModelInfo,
        *,
        texts: Sequence[str],
        last_user: str,
        options: dict[str, Any],
        fmt: Any,
        extra_prompt_tokens: int,
        keep_alive: float,
        t0: int,
    ) -> Plan:
        prompt_tokens = extra_prompt_tokens + sum(count_tokens(t) for t in texts)
        prompt_ids = [_token_id(p) for t in texts for p in split_tokens(t)]
        stripped = last_user.lstrip()
        if stripped[:5].lower() == "echo:":
            pieces = split_tokens(stripped[5:].strip())
        else:
            directive = _TOKENS_DIRECTIVE.search(last_user)
            seed = json.dumps([info.name, list(texts), options.get("seed")], ensure_ascii=False).encode()
            if directive:
                n = int(directive.group(1))
            else:
                lo, hi = self.settings.min_tokens, max(self.settings.min_tokens, self.settings.max_tokens)
                n = lo + int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % (hi - lo + 1)
            pieces = _compose(seed, n)
        if fmt == "json" or isinstance(fmt, dict):
            pieces = split_tokens(json.dumps({"response": "".join(pieces)}))
        done_reason = "stop"
        eval_count = len(pieces)
        stops = options.get("stop")
        if isinstance(stops, str):
            stops = [stops]
        if isinstance(stops, list) and any(isinstance(s, str) and s for s in stops):
            text = ""
            for i, piece in enumerate(pieces):
                candidate = text + piece
                hits = [candidate.find(s, max(0, len(text) - len(s))) for s in stops if isinstance(s, str) and s]
                hits = [h for h in hits if h >= 0]
                if hits:
                    cut = min(hits)
                    head = candidate[len(text) : cut] if cut > len(text) else ""
                    pieces = pieces[:i] + ([head] if head else [])
                    eval_count = i + 1
                    break
                text = candidate
        num_predict = options.get("num_predict")
        if isinstance(num_predict, int | float) and not isinstance(num_predict, bool) and num_predict > 0:
            limit = int(num_predict)
            if eval_count > limit:
                pieces, eval_count, done_reason = pieces[:limit], limit, "length"
        return Plan(kind, info, pieces, eval_count, done_reason, prompt_tokens, prompt_ids, keep_alive, t0)

    # ---- running it -------------------------------------------------------------------------

    async def _produce(self, plan: Plan, fault: Applied | None) -> AsyncIterator[tuple[str, Any]]:
        """Events: ("token", piece), then ("done", stats) or a fault's ("error"|"disconnect"|"garbage")."""
        mode = fault.mode if fault is not None else None
        name = plan.model.name
        try:
            load_ns = await self._ensure_loaded(name, plan.keep_alive, fault)
            t = _now_ns()
            pd = self.settings.prompt_delay * plan.prompt_tokens
            if pd > 0:
                await asyncio.sleep(pd)
            prompt_ns = max(_now_ns() - t, 1_000)
            pieces, eval_count, reason = plan.pieces, plan.eval_count, plan.done_reason
            if mode == "empty":
                pieces, eval_count, reason = [], 1, "stop"
            delay = self.settings.token_delay
            if mode == "cpu_fallback":
                delay *= fault.num("factor", 10.0) if fault else 10.0
            after = int(fault.num("after", 1 if mode == "malformed" else 3)) if mode in _MIDSTREAM and fault else -1
            t_eval = _now_ns()
            for i, piece in enumerate(pieces):
                if i == after:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                yield ("token", piece)
            if mode in _MIDSTREAM and fault is not None:
                if mode == "error_midstream":
                    self._loaded.pop(name, None)  # the runner died
                    yield ("error", str(fault.params.get("message") or MIDSTREAM_EOF))
                elif mode == "disconnect_midstream":
                    yield ("disconnect", None)
                else:
                    yield ("garbage", list(GARBAGE_LINES))
                return
            eval_ns = max(_now_ns() - t_eval, 1_000)
            self._touch(name, plan.keep_alive)
            total = _now_ns() - plan.t0
            stats = {
                "done_reason": reason,
                "total_duration": max(total, load_ns + prompt_ns + eval_ns),
                "load_duration": load_ns,
                "prompt_eval_count": plan.prompt_tokens,
                "prompt_eval_duration": prompt_ns,
                "eval_count": eval_count,
                "eval_duration": eval_ns,
                "context": plan.prompt_ids + [_token_id(p) for p in pieces],
            }
            yield ("done", stats)
        except asyncio.CancelledError:
            self.cancelled += 1  # the client went away while the model loaded, read or waited
            raise
        finally:
            # A request that never finished leaves the model loaded with the default expiry.
            if self._loaded.get(name) == math.inf and not math.isinf(plan.keep_alive):
                self._touch(name, plan.keep_alive)

    # ---- native generate / chat -------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._native(request, "generate")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._native(request, "chat")

    async def _native(self, request: web.Request, kind: str) -> web.StreamResponse:
        t0 = _now_ns()
        fault: Applied | None = request.get(_FAULT_KEY)
        body = await self._body(request)
        info = self._model(body)
        keep_alive = self._keep_alive(body)
        if not info.generates:
            raise ApiError(400, f'"{info.name}" does not support {kind}')
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        if kind == "generate":
            prompt = body.get("prompt") or ""
            system = body.get("system") or ""
            if not isinstance(prompt, str) or not isinstance(system, str):
                raise ApiError(400, "prompt must be a string")
            empty = not prompt and not body.get("images")
            texts = [t for t in (system, prompt) if t]
            last_user = prompt
            context = body.get("context") if isinstance(body.get("context"), list) else []
            extra = len(context)
        else:
            messages = body.get("messages")
            if messages is None:
                messages = []
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ApiError(400, "messages must be a list of objects")
            empty = not messages
            texts = [m.get("content") for m in messages if isinstance(m.get("content"), str) and m.get("content")]
            users = [m.get("content") for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
            last_user = users[-1] if users else (texts[-1] if texts else "")
            extra = 0
        if empty:
            return await self._load_request(info, kind, keep_alive, fault)
        plan = self._plan(
            kind,
            info,
            texts=texts,
            last_user=last_user,
            options=options,
            fmt=body.get("format"),
            extra_prompt_tokens=extra,
            keep_alive=keep_alive,
            t0=t0,
        )
        if body.get("stream", True) is False:
            return await self._native_whole(request, plan, fault)
        return await self._native_stream(request, plan, fault)

    async def _load_request(self, info: ModelInfo, kind: str, keep_alive: float, fault: Applied | None) -> web.Response:
        if keep_alive == 0:
            self._loaded.pop(info.name, None)
            reason = "unload"
        else:
            await self._ensure_loaded(info.name, keep_alive, fault)
            self._touch(info.name, keep_alive)
            reason = "load"
        out: dict[str, Any] = {"model": info.name, "created_at": _now_iso()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": ""}
            out["done_reason"] = reason
            out["done"] = True
        else:
            out.update({"response": "", "done": True, "done_reason": reason})
        return _json(out)

    def _native_chunk(self, plan: Plan, piece: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": plan.model.name, "created_at": _now_iso()}
        if plan.kind == "chat":
            out["message"] = {"role": "assistant", "content": piece}
        else:
            out["response"] = piece
        out["done"] = False
        return out

    def _native_final(self, plan: Plan, stats: dict[str, Any], text: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": plan.model.name, "created_at": _now_iso()}
        context = stats["context"]
        rest = {k: v for k, v in stats.items() if k not in ("done_reason", "context")}
        if plan.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
            out["done_reason"] = stats["done_reason"]
            out["done"] = True
        else:
            out.update({"response": text, "done": True, "done_reason": stats["done_reason"], "context": context})
        out.update(rest)
        return out

    async def _native_stream(self, request: web.Request, plan: Plan, fault: Applied | None) -> web.StreamResponse:
        out = _Chunks(self, request, "application/x-ndjson")
        send = out.send

        try:
            async with contextlib.aclosing(self._produce(plan, fault)) as events:
                async for event, value in events:
                    if event == "token":
                        await send(_line(self._native_chunk(plan, value)))
                    elif event == "done":
                        await send(_line(self._native_final(plan, value, "")))
                    elif event == "error":
                        if out.resp is None:  # nothing written yet: Ollama sets the status
                            return _json({"error": value}, 500)
                        await send(_line({"error": value}))
                    elif event == "disconnect":
                        _abort(request)
                        return out.resp or web.Response(status=500)
                    elif event == "garbage":
                        for line in value:
                            await send(line.encode() + b"\n")
        except ConnectionError:
            self.cancelled += 1  # the client went away: generation stops (ollama#1695)
            _abort(request)
        return out.resp or web.Response(status=500)

    async def _native_whole(self, request: web.Request, plan: Plan, fault: Applied | None) -> web.StreamResponse:
        parts: list[str] = []
        async with contextlib.aclosing(self._produce(plan, fault)) as events:
            async for event, value in events:
                if event == "token":
                    parts.append(value)
                elif event == "done":
                    return _json(self._native_final(plan, value, "".join(parts)))
                elif event == "error":
                    return _json({"error": value}, 500)
                elif event == "disconnect":
                    _abort(request)
                    return web.Response(status=500)
                elif event == "garbage":
                    return web.Response(status=200, body="\n".join(value).encode(), content_type="application/json")
        return web.Response(status=500)

    # ---- embeddings -------------------------------------------------------------------------

    def _dim(self, info: ModelInfo, requested: Any = None) -> int:
        dim = self.settings.embed_dim or info.embedding_length
        if isinstance(requested, int) and not isinstance(requested, bool) and 0 < requested < dim:
            dim = requested
        return dim

    async def _embed_vectors(
        self, request: web.Request, info: ModelInfo, inputs: list[str], keep_alive: float, truncate: bool, dimensions: Any
    ) -> tuple[list[list[float]], dict[str, Any]] | web.StreamResponse:
        fault: Applied | None = request.get(_FAULT_KEY)
        t0 = _now_ns()
        mode = fault.mode if fault else None
        if mode == "disconnect_midstream":
            _abort(request)
            return web.Response(status=500)
        if mode == "malformed":
            return web.Response(status=200, body="\n".join(GARBAGE_LINES).encode(), content_type="application/json")
        if mode == "error_midstream":
            self._loaded.pop(info.name, None)
            raise ApiError(500, str(fault.params.get("message") or MIDSTREAM_EOF) if fault else MIDSTREAM_EOF)
        counts = [count_tokens(t) for t in inputs]
        if not truncate and any(c > info.context_length for c in counts):
            raise ApiError(400, "the input length exceeds the context length")
        load_ns = await self._ensure_loaded(info.name, keep_alive, fault)
        total_tokens = sum(counts)
        if self.settings.prompt_delay * total_tokens > 0:
            await asyncio.sleep(self.settings.prompt_delay * total_tokens)
        dim = self._dim(info, dimensions)
        vectors = [] if mode == "empty" else [embed_text(info.name, t, dim) for t in inputs]
        self._touch(info.name, keep_alive)
        stats = {"total_duration": max(_now_ns() - t0, load_ns), "load_duration": load_ns, "prompt_eval_count": total_tokens}
        return vectors, stats

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        info = self._model(body)
        keep_alive = self._keep_alive(body)
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            inputs: list[str] = []
        elif isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = list(raw)
        else:
            raise ApiError(400, "invalid input type")
        if not inputs:
            if keep_alive == 0:
                self._loaded.pop(info.name, None)
            else:
                await self._ensure_loaded(info.name, keep_alive, request.get(_FAULT_KEY))
                self._touch(info.name, keep_alive)
            return _json({"model": info.name, "embeddings": []})
        result = await self._embed_vectors(request, info, inputs, keep_alive, body.get("truncate", True) is not False, body.get("dimensions"))
        if isinstance(result, web.StreamResponse):
            return result
        vectors, stats = result
        return _json({"model": info.name, "embeddings": vectors, **stats})

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        info = self._model(body)
        keep_alive = self._keep_alive(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        if not prompt:
            await self._ensure_loaded(info.name, keep_alive, request.get(_FAULT_KEY))
            self._touch(info.name, keep_alive)
            return _json({"embedding": []})
        result = await self._embed_vectors(request, info, [prompt], keep_alive, True, None)
        if isinstance(result, web.StreamResponse):
            return result
        vectors, _ = result
        return _json({"embedding": vectors[0] if vectors else []})

    # ---- the OpenAI-compatible layer --------------------------------------------------------

    def _v1_messages(self, messages: Any) -> tuple[list[str], str]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        texts: list[str] = []
        last_user = ""
        for msg in messages:
            if not isinstance(msg, dict):
                raise ApiError(400, "invalid message format")
            content = msg.get("content")
            parts: list[str]
            if isinstance(content, str):
                parts = [content]
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict):
                        raise ApiError(400, "invalid message format")
                    if part.get("type") == "text":
                        if not isinstance(part.get("text"), str):
                            raise ApiError(400, "invalid message format")
                        parts.append(part["text"])
                    elif part.get("type") != "image_url":
                        raise ApiError(400, "invalid message format")
            elif content is None and msg.get("tool_calls"):
                parts = []
            else:
                raise ApiError(400, f"invalid message content type: {type(content).__name__}")
            texts.extend(p for p in parts if p)
            if msg.get("role") == "user" and parts:
                last_user = parts[-1]
        return texts, last_user or (texts[-1] if texts else "")

    @staticmethod
    def _v1_options(body: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        stop = body.get("stop")
        if isinstance(stop, str):
            options["stop"] = [stop]
        elif isinstance(stop, list):
            if not all(isinstance(s, str) for s in stop):
                raise ApiError(400, "invalid type for 'stop' field")
            options["stop"] = stop
        if body.get("max_tokens") is not None:
            options["num_predict"] = body["max_tokens"]
        if body.get("seed") is not None:
            options["seed"] = body["seed"]
        return options

    async def _v1_chat(self, request: web.Request) -> web.StreamResponse:
        t0 = _now_ns()
        fault: Applied | None = request.get(_FAULT_KEY)
        body = await self._body(request)
        texts, last_user = self._v1_messages(body.get("messages"))
        options = self._v1_options(body)
        info = self._model(body)
        if not info.generates:
            raise ApiError(400, f'"{info.name}" does not support chat')
        fmt: Any = None
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
            fmt = "json"
        plan = self._plan(
            "chat",
            info,
            texts=texts,
            last_user=last_user,
            options=options,
            fmt=fmt,
            extra_prompt_tokens=0,
            keep_alive=self.settings.keep_alive,
            t0=t0,
        )
        return await self._v1_run(request, plan, fault, body, chat=True)

    async def _v1_completions(self, request: web.Request) -> web.StreamResponse:
        t0 = _now_ns()
        fault: Applied | None = request.get(_FAULT_KEY)
        body = await self._body(request)
        options = self._v1_options(body)
        info = self._model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        plan = self._plan(
            "completion",
            info,
            texts=[prompt] if prompt else [],
            last_user=prompt,
            options=options,
            fmt=None,
            extra_prompt_tokens=0,
            keep_alive=self.settings.keep_alive,
            t0=t0,
        )
        return await self._v1_run(request, plan, fault, body, chat=False)

    async def _v1_run(
        self, request: web.Request, plan: Plan, fault: Applied | None, body: dict[str, Any], *, chat: bool
    ) -> web.StreamResponse:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{random.randrange(999)}"
        created = int(time.time())
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        model = plan.model.name

        def chunk(piece: str, reason: str | None) -> dict[str, Any]:
            base: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
            }
            if chat:
                base["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": reason}]
            else:
                base["choices"] = [{"text": piece, "index": 0, "finish_reason": reason}]
                if include_usage:
                    base["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            return base

        def usage(stats: dict[str, Any]) -> dict[str, int]:
            p, c = stats["prompt_eval_count"], stats["eval_count"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not body.get("stream"):
            parts: list[str] = []
            async with contextlib.aclosing(self._produce(plan, fault)) as events:
                async for event, value in events:
                    if event == "token":
                        parts.append(value)
                    elif event == "done":
                        text = "".join(parts)
                        choice: dict[str, Any]
                        if chat:
                            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": value["done_reason"]}
                        else:
                            choice = {"text": text, "index": 0, "finish_reason": value["done_reason"]}
                        return _json(
                            {
                                "id": ident,
                                "object": "chat.completion" if chat else "text_completion",
                                "created": created,
                                "model": model,
                                "system_fingerprint": "fp_ollama",
                                "choices": [choice],
                                "usage": usage(value),
                            }
                        )
                    elif event == "error":
                        return _json(_v1_error_body(500, value), 500)
                    elif event == "disconnect":
                        _abort(request)
                        return web.Response(status=500)
                    elif event == "garbage":
                        return web.Response(status=200, body="\n".join(value).encode(), content_type="application/json")
            return web.Response(status=500)

        out = _Chunks(self, request, "text/event-stream")
        send = out.send

        try:
            async with contextlib.aclosing(self._produce(plan, fault)) as events:
                async for event, value in events:
                    if event == "token":
                        await send(_sse(chunk(value, None)))
                    elif event == "done":
                        last = chunk("", value["done_reason"])
                        await send(_sse(last))
                        if include_usage:
                            last = dict(last, choices=[], usage=usage(value))
                            await send(_sse(last))
                        await send(b"data: [DONE]\n\n")
                    elif event == "error":
                        if out.resp is None:
                            return _json(_v1_error_body(500, value), 500)
                        await send(_sse(_v1_error_body(500, value)))
                    elif event == "disconnect":
                        _abort(request)
                        return out.resp or web.Response(status=500)
                    elif event == "garbage":
                        for line in value:
                            await send(b"data: " + line.encode() + b"\n\n")
        except ConnectionError:
            self.cancelled += 1
            _abort(request)
        return out.resp or web.Response(status=500)

    async def _v1_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        fmt = body.get("encoding_format") or ""
        if fmt and str(fmt).lower() not in ("float", "base64"):
            raise ApiError(400, f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].")
        raw = body.get("input")
        if raw == "":
            raw = [""]
        if raw is None or raw == []:
            raise ApiError(400, "invalid input")
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = list(raw)
        else:
            raise ApiError(400, "invalid input")
        info = self._model(body)
        result = await self._embed_vectors(request, info, inputs, self.settings.keep_alive, True, body.get("dimensions"))
        if isinstance(result, web.StreamResponse):
            return result
        vectors, stats = result
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if str(fmt).lower() == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        n = stats["prompt_eval_count"]
        return _json(
            {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": n, "total_tokens": n}}
        )

    def _v1_model_entry(self, info: ModelInfo) -> dict[str, Any]:
        created = int(datetime.fromisoformat(info.modified_at.replace("Z", "+00:00")).timestamp())
        owner = info.name.split("/")[0] if "/" in info.name else "library"
        return {"id": info.name, "object": "model", "created": created, "owned_by": owner}

    async def _v1_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._v1_model_entry(m) for m in self.models.values()]})

    async def _v1_model(self, request: web.Request) -> web.Response:
        raw = request.match_info["model"]
        info = self.models.get(normalize_name(raw))
        if info is None:
            raise ApiError(404, f"model '{raw}' not found")
        entry = self._v1_model_entry(info)
        entry["id"] = raw
        return _json(entry)


# --------------------------------------------------------------------------------------------
# running it as a process


_LIVE: set[subprocess.Popen[str]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(2)


@dataclass
class StandinProcess:
    """A stand-in running as its own process (`python -m charter.models.standin`)."""

    popen: subprocess.Popen[str]
    host: str
    port: int
    control_port: int | None
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def control_url(self) -> str:
        """Where `/__standin/*` answers: the control port if there is one, else the main port."""
        return f"http://{self.host}:{self.control_port or self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the process dies on the spot, connections and all."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def suspend(self) -> None:
        """SIGSTOP: the process stays, its port accepts (the kernel backlog), nothing answers."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGCONT then SIGTERM, SIGKILL if it does not go in time."""
        if self.alive():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGCONT)
                self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        _LIVE.discard(self.popen)

    def __enter__(self) -> StandinProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cli_args(
    *,
    host: str,
    port: int,
    models: Iterable[str] | None,
    fault: str | None,
    fault_count: int | None,
    fault_after: int | None,
    fault_seconds: float | None,
    control_port: int | bool | None,
    token_delay: float | None,
    load_delay: float | None,
    keep_alive: str | float | None,
) -> list[str]:
    args = ["--host", host, "--port", str(port)]
    if models is not None:
        args += ["--models", ",".join(models)]
    if fault:
        args += ["--fault", fault]
    if fault_count is not None:
        args += ["--fault-count", str(fault_count)]
    if fault_after is not None:
        args += ["--fault-after", str(fault_after)]
    if fault_seconds is not None:
        args += ["--fault-seconds", str(fault_seconds)]
    if control_port is True:
        args += ["--control-port", "0"]
    elif isinstance(control_port, int) and control_port is not False:
        args += ["--control-port", str(control_port)]
    if token_delay is not None:
        args += ["--token-delay", str(token_delay)]
    if load_delay is not None:
        args += ["--load-delay", str(load_delay)]
    if keep_alive is not None:
        args += ["--keep-alive", str(keep_alive)]
    return args


def spawn_standin(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    models: Iterable[str] | None = None,
    fault: str | None = None,
    fault_count: int | None = None,
    fault_after: int | None = None,
    fault_seconds: float | None = None,
    control_port: int | bool | None = None,
    token_delay: float | None = None,
    load_delay: float | None = None,
    keep_alive: str | float | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
    stderr: Any = None,
    env: dict[str, str] | None = None,
) -> StandinProcess:
    """Start `python -m charter.models.standin` and wait until it answers.

    Port 0 (the default) lets the child pick a free port and report it; `control_port=True` asks
    for a control port too. Returns a `StandinProcess` with `port`, `control_port` and `pid`.
    """
    cmd = [sys.executable, "-m", "charter.models.standin"]
    cmd += _cli_args(
        host=host,
        port=port,
        models=models,
        fault=fault,
        fault_count=fault_count,
        fault_after=fault_after,
        fault_seconds=fault_seconds,
        control_port=control_port,
        token_delay=token_delay,
        load_delay=load_delay,
        keep_alive=keep_alive,
    )
    cmd += list(extra_args)
    popen = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True
    )
    _LIVE.add(popen)
    deadline = time.monotonic() + timeout
    assert popen.stdout is not None
    info: dict[str, Any] | None = None
    try:
        while info is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"stand-in Ollama did not report ready within {timeout}s")
            ready, _, _ = select.select([popen.stdout], [], [], min(remaining, 0.2))
            if not ready:
                if popen.poll() is not None:
                    raise RuntimeError(f"stand-in Ollama exited with status {popen.returncode} before it was ready")
                continue
            line = popen.stdout.readline()
            if not line:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                raise RuntimeError(f"stand-in Ollama exited with status {popen.returncode} before it was ready")
            with contextlib.suppress(ValueError):
                candidate = json.loads(line)
                if isinstance(candidate, dict) and candidate.get("event") == "ready":
                    info = candidate
        proc = StandinProcess(popen, host, int(info["port"]), info.get("control_port"), popen.pid)
        if fault not in ("exit", "refuse"):
            _wait_answers(proc.url + "/", deadline)
        return proc
    except BaseException:
        popen.kill()
        popen.wait()
        _LIVE.discard(popen)
        raise


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_answers(url: str, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with _NO_PROXY.open(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"stand-in Ollama did not answer at {url}: {last}")


async def spawn_standin_async(**kwargs: Any) -> StandinProcess:
    """`spawn_standin` without blocking the event loop."""
    return await asyncio.to_thread(functools.partial(spawn_standin, **kwargs))


# --------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m charter.models.standin", description="A stand-in Ollama server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434, help="0 picks a free port (reported on stdout)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--fault", choices=FAULT_MODES, default="none")
    p.add_argument("--fault-count", type=int, default=None, help="requests the fault applies to (default: all)")
    p.add_argument("--fault-after", type=int, default=None, help="chunks before a midstream fault")
    p.add_argument("--fault-seconds", type=float, default=None, help="slow_first_token load time; refuse duration")
    p.add_argument("--control-port", type=int, nargs="?", const=0, default=None, help="serve /__standin/* here too")
    p.add_argument("--token-delay", type=float, default=0.001, help="seconds per generated token")
    p.add_argument("--prompt-delay", type=float, default=0.00002, help="seconds per prompt token")
    p.add_argument("--load-delay", type=float, default=0.02, help="seconds to load a cold model")
    p.add_argument("--keep-alive", default="5m", help="default keep_alive (Go duration or seconds)")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=None, help="override every model's embedding size")
    p.add_argument("--ollama-version", default=OLLAMA_VERSION)
    return p


def _keep_alive_arg(text: str) -> str | float:
    """`--keep-alive`: a bare number is seconds, as in a request; anything else a Go duration."""
    return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text.strip()) else text


async def _serve(ns: argparse.Namespace) -> None:
    keep_alive = _keep_alive_arg(ns.keep_alive)
    server = StandinOllama(
        [m for m in ns.models.split(",") if m.strip()],
        token_delay=ns.token_delay,
        prompt_delay=ns.prompt_delay,
        load_delay=ns.load_delay,
        keep_alive=keep_alive,
        min_tokens=ns.min_tokens,
        max_tokens=ns.max_tokens,
        embed_dim=ns.embed_dim,
        version=ns.ollama_version,
    )
    params: dict[str, Any] = {}
    if ns.fault_after is not None:
        params["after"] = ns.fault_after
    if ns.fault_seconds is not None:
        params["seconds"] = ns.fault_seconds
    server.set_fault(ns.fault, ns.fault_count, **params)
    port = await server.start(ns.host, ns.port, control_port=ns.control_port)
    ready = {
        "event": "ready",
        "url": f"http://{ns.host}:{port}",
        "host": ns.host,
        "port": port,
        "control_port": server.control_port,
        "pid": os.getpid(),
        "fault": server.fault.mode,
        "listening": server.listening,
    }
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    sys.stdout = sys.stderr  # nothing else goes to the pipe the parent may have stopped reading
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    ns = _parser().parse_args(argv)
    try:
        parse_keep_alive(_keep_alive_arg(ns.keep_alive))
    except ValueError as exc:
        raise SystemExit(f"--keep-alive: {exc}") from None
    asyncio.run(_serve(ns))


if __name__ == "__main__":
    main()

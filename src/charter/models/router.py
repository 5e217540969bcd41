"""The router: an alias names a chain; each request walks it, skipping what is down or not allowed.

A failure before the first token reached the client fails over unseen. A failure after it either
continues on the next rung with the partial answer as context (and says so), or ends the stream
with a well-formed error, as configured. Breakers are shared by every request, and deep probes
(a tiny real generation that must not come back empty) close them again when a backend recovers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from charter.config import ModelsConfig
from charter.models.backends.base import Backend
from charter.models.backends.degraded import AnswerCache, degraded_answer, prompt_key
from charter.models.backends.ollama import OllamaBackend
from charter.models.backends.openai import OpenAIBackend
from charter.models.breaker import OPEN, Breaker
from charter.models.types import Attempt, BackendError, ChatRequest, Final

log = logging.getLogger("charter.models")
DEGRADED = "degraded"


class Skip(Exception):
    """The governor says this rung may not be used for this call (policy or budget)."""


class Governor(Protocol):
    async def admit(self, ref: str, kind: str, model: str, req: ChatRequest) -> Any: ...

    async def settle(self, admission: Any, final: Final | None, text: str) -> None: ...

    async def release(self, admission: Any) -> None: ...


class UnknownModel(Exception):
    pass


class AllFailed(Exception):
    def __init__(self, attempts: list[Attempt]) -> None:
        super().__init__("; ".join(f"{a.ref}: {a.reason}" for a in attempts) or "no backend in the chain")
        self.attempts = attempts


class MidstreamError(Exception):
    def __init__(self, attempts: list[Attempt], reason: str) -> None:
        super().__init__(reason)
        self.attempts = attempts
        self.reason = reason


@dataclass
class CallResult:
    ref: str
    final: Final
    attempts: list[Attempt]
    text: str
    continued_after: list[str] = field(default_factory=list)  # rungs that failed after tokens went out
    degraded: bool = False

    @property
    def fallbacks(self) -> list[Attempt]:
        return [a for a in self.attempts if a.outcome != "ok"]


def build_backend(name: str, cfg: Any, connect: float) -> Backend:
    if cfg.kind == "ollama":
        return OllamaBackend(name, cfg.url, connect=connect)
    return OpenAIBackend(name, cfg.url, api_key_env=cfg.api_key_env, api_key_file=cfg.api_key_file, connect=connect)


HealthHook = Callable[[str, str, str], Awaitable[None]]  # backend, new state, reason


class Router:
    def __init__(self, config: ModelsConfig, *, on_health: HealthHook | None = None) -> None:
        self.config = config
        t = config.timeouts
        self.backends: dict[str, Backend] = {n: build_backend(n, c, t.connect) for n, c in config.backends.items()}
        b = config.breaker
        self.breakers = {n: Breaker(n, b.failures, b.cooldown, b.max_cooldown) for n in self.backends}
        self.cache = AnswerCache(config.degraded_cache)
        self.on_health = on_health
        self._probe_task: asyncio.Task[None] | None = None
        self.last_probe: dict[str, dict[str, Any]] = {}

    # -- names -----------------------------------------------------------------------------

    def resolve(self, model: str) -> tuple[str, list[str]]:
        """An alias gives its chain; `backend/model` names one rung directly."""
        if model in self.config.aliases:
            return model, list(self.config.aliases[model])
        backend = model.split("/", 1)[0]
        if "/" in model and backend in self.backends:
            return model, [model]
        if model == DEGRADED:
            return model, [DEGRADED]
        raise UnknownModel(model)

    def names(self) -> list[str]:
        seen = dict.fromkeys(self.config.aliases)
        for chain in self.config.aliases.values():
            for ref in chain:
                if ref != DEGRADED:
                    seen.setdefault(ref, None)
        return list(seen)

    # -- health ----------------------------------------------------------------------------

    async def _record_failure(self, name: str, err: BackendError) -> None:
        changed = self.breakers[name].failure(str(err), err.hard)
        if changed and self.on_health:
            await self.on_health(name, changed, str(err))

    async def _record_success(self, name: str) -> None:
        old = self.breakers[name].success()
        if old and self.on_health:
            await self.on_health(name, "closed", f"recovered (was {old})")

    async def _first_token_timeout(self, backend: Backend, model: str) -> float:
        t = self.config.timeouts
        try:
            loaded = await backend.is_loaded(model)
        except Exception:  # noqa: BLE001 - load state is a hint only
            loaded = None
        return t.cold_first_token if loaded is False else t.first_token

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, alias: str, chain: list[str], req: ChatRequest, governor: Governor
                   ) -> AsyncIterator[str | CallResult]:
        """Text pieces as they arrive, then one CallResult. Raises AllFailed or MidstreamError."""
        t = self.config.timeouts
        attempts: list[Attempt] = []
        delivered = ""
        continued: list[str] = []
        for ref in chain:
            started = time.perf_counter()
            if ref == DEGRADED:
                # still an answer to this agent (maybe a cached model answer): policy decides it too
                try:
                    await governor.release(await governor.admit(ref, DEGRADED, DEGRADED, req))
                except Skip as why:
                    attempts.append(Attempt(ref, "skipped", str(why)))
                    continue
                cached = self.cache.get(prompt_key(alias, req.messages)) if not delivered else None
                text = degraded_answer([(a.ref, a.reason) for a in attempts], cached)
                if delivered:
                    text = "\n\n" + text
                attempts.append(Attempt(ref, "ok", "degraded mode", (time.perf_counter() - started) * 1000))
                yield text
                yield CallResult(ref, Final("stop", 0, len(text.split())), attempts, delivered + text, continued, True)
                return
            name, model = ref.split("/", 1)
            backend, breaker = self.backends[name], self.breakers[name]
            if not breaker.allow():
                attempts.append(Attempt(ref, "skipped", f"circuit open ({breaker.last_reason})"))
                continue
            try:
                admission = await governor.admit(ref, backend.kind, model, req)
            except Skip as why:
                attempts.append(Attempt(ref, "skipped", str(why)))
                continue
            sub = req
            if delivered:
                sub = ChatRequest([*req.messages, {"role": "assistant", "content": delivered}], req.max_tokens,
                                  req.temperature, req.top_p, req.stop, req.seed, req.extra_options)
            got = ""
            final: Final | None = None
            sent = False
            try:
                first = await self._first_token_timeout(backend, model)
                # Closed here, not left to the garbage collector: an async generator dropped half-way
                # is finalised through the loop (a thread-safe wake-up and a task per generator),
                # and its HTTP response stays open until then.
                async with aclosing(backend.stream(model, sub, first_token=first, idle=t.idle,
                                                   total=t.total)) as stream:
                    sent = True
                    async for piece in stream:
                        if isinstance(piece, Final):
                            final = piece
                            break
                        got += piece
                        yield piece
                    else:
                        raise BackendError("truncated", "the backend's stream ended without a final message")
            except BackendError as err:
                # First: the health event below may fail, the reservation must not stay held. A
                # backend that had begun its answer read the prompt (a paid API bills it, answer or
                # not): booked, with what it reported using if it did, else the prompt's bound and
                # what went out. One that refused or never answered is owed nothing.
                if got or err.answered or err.usage is not None:
                    await governor.settle(admission, err.usage, got)
                else:
                    await governor.release(admission)
                if err.kind != "unconfigured":
                    await self._record_failure(name, err)
                attempts.append(Attempt(ref, "skipped" if err.kind == "unconfigured" else "failed", str(err),
                                        (time.perf_counter() - started) * 1000))
                if got or delivered:
                    delivered += got
                    continued.append(ref)
                    if self.config.midstream == "error":
                        raise MidstreamError(attempts, str(err)) from None
                continue
            except BaseException:
                # The client went away (cancelled), nothing to record. It pays for what went out,
                # and, once the request was on its way, for its prompt: a backend that has read a
                # prompt has done that work, and a paid API bills it, answer or not.
                if sent or got:
                    await governor.settle(admission, None, got)
                else:
                    await governor.release(admission)
                raise
            # The answer is complete (and its stream closed): outside the try, so nothing after this
            # point can count as the backend's failure or settle the reservation a second time.
            assert final is not None  # the loop above either found it or raised
            await governor.settle(admission, final, got)  # before the health event, which may fail
            await self._record_success(name)
            attempts.append(Attempt(ref, "ok", "", (time.perf_counter() - started) * 1000))
            full = delivered + got
            if not continued:
                self.cache.put(prompt_key(alias, req.messages), full, ref)
            yield CallResult(ref, final, attempts, full, continued)
            return
        if delivered:
            raise MidstreamError(attempts, "every remaining backend failed after the answer had started")
        raise AllFailed(attempts)

    async def embed(self, chain: list[str], inputs: list[str], governor: Governor
                    ) -> tuple[str, list[list[float]], int, list[Attempt]]:
        attempts: list[Attempt] = []
        for ref in chain:
            if ref == DEGRADED:
                continue
            name, model = ref.split("/", 1)
            backend, breaker = self.backends[name], self.breakers[name]
            if not breaker.allow():
                attempts.append(Attempt(ref, "skipped", f"circuit open ({breaker.last_reason})"))
                continue
            req = ChatRequest([{"role": "user", "content": " ".join(inputs)}], max_tokens=0)
            try:
                admission = await governor.admit(ref, backend.kind, model, req)
            except Skip as why:
                attempts.append(Attempt(ref, "skipped", str(why)))
                continue
            started = time.perf_counter()
            try:
                vectors, tokens = await backend.embed(model, inputs, timeout=self.config.timeouts.total)
            except BackendError as err:  # as for a chat: owed for its inputs once it had answered
                await (governor.settle(admission, err.usage, "") if err.answered else governor.release(admission))
                await self._record_failure(name, err)
                attempts.append(Attempt(ref, "failed", str(err), (time.perf_counter() - started) * 1000))
                continue
            except BaseException:  # cancelled with the inputs sent: as for a chat, they are paid for
                await governor.settle(admission, None, "")  # (left held, its expiry would book all of it)
                raise
            await governor.settle(admission, Final("stop", tokens, 0), "")
            await self._record_success(name)
            attempts.append(Attempt(ref, "ok", "", (time.perf_counter() - started) * 1000))
            return ref, vectors, tokens, attempts
        raise AllFailed(attempts)

    # -- probes ----------------------------------------------------------------------------

    def probe_model(self, name: str) -> str | None:
        for chain in self.config.aliases.values():
            for ref in chain:
                if ref.startswith(name + "/"):
                    return ref.split("/", 1)[1]
        return None

    async def probe(self, name: str) -> dict[str, Any]:
        """A tiny real generation: healthy only if it returns non-empty text in time."""
        backend, model = self.backends[name], self.probe_model(name)
        started = time.perf_counter()
        result: dict[str, Any] = {"backend": name, "model": model, "at": time.time()}
        if model is None:
            result.update(ok=None, reason="no alias uses this backend")
            self.last_probe[name] = result
            return result
        p = self.config.probe
        req = ChatRequest([{"role": "user", "content": p.prompt}], max_tokens=8)
        text = ""
        try:
            first = await self._first_token_timeout(backend, model)
            async with asyncio.timeout(max(p.timeout, first if first > p.timeout else 0)), \
                    aclosing(backend.stream(model, req, first_token=first, idle=p.timeout,
                                            total=p.timeout + first)) as stream:
                async for piece in stream:
                    if isinstance(piece, Final):
                        break
                    text += piece
            if not text.strip():
                raise BackendError("empty", "the probe's answer was empty")
            result.update(ok=True, reason="", ms=round((time.perf_counter() - started) * 1000, 1))
            await self._record_success(name)
        except (BackendError, TimeoutError) as exc:
            err = exc if isinstance(exc, BackendError) else BackendError("timeout", "the probe timed out")
            result.update(ok=False, reason=str(err), ms=round((time.perf_counter() - started) * 1000, 1))
            if err.kind != "unconfigured":
                await self._record_failure(name, err)
        self.last_probe[name] = result
        return result

    async def probe_forever(self) -> None:
        """Probe every backend each interval, and an open one as soon as its cooldown ends."""
        next_full = 0.0
        while True:
            now = time.monotonic()
            due = []
            for name, br in self.breakers.items():
                if now >= next_full or (br.state == OPEN and br.retry_in(now) == 0):
                    due.append(name)
            if now >= next_full:
                next_full = now + self.config.probe.interval
            if due:
                await asyncio.gather(*(self.probe(n) for n in due), return_exceptions=True)
            await asyncio.sleep(0.25)

    def start_probes(self) -> None:
        if self.backends and self._probe_task is None:
            self._probe_task = asyncio.get_running_loop().create_task(self.probe_forever())

    async def close(self) -> None:
        if self._probe_task:
            self._probe_task.cancel()
        for b in self.backends.values():
            await b.close()

    def health(self) -> list[dict[str, Any]]:
        out = []
        for name, br in self.breakers.items():
            out.append({**br.to_dict(), "kind": self.backends[name].kind,
                        "url": getattr(self.backends[name], "url", ""), "probe": self.last_probe.get(name)})
        return out

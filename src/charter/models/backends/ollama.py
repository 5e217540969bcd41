"""Ollama's native API: NDJSON streams, `{"error": ...}` lines under HTTP 200, `/api/ps` load state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from charter.models.backends.base import (
    HttpBackend,
    StreamedBody,
    classify_client_error,
    decode_event,
    embed_answer,
    embed_vectors,
    error_body,
    open_stream,
    options_for,
    reported,
)
from charter.models.types import BackendError, ChatRequest, Final


def embeddings_of(doc: dict[str, Any], count: int) -> tuple[list[list[float]], int]:
    """The vectors and prompt tokens of an `/api/embed` answer (see `embed_vectors`)."""
    return embed_vectors(doc.get("embeddings"), count, doc.get("prompt_eval_count"))


class OllamaBackend(HttpBackend):
    kind = "ollama"

    def __init__(self, name: str, url: str, *, connect: float = 2.0) -> None:
        super().__init__(name, url, connect=connect)
        self._ps: tuple[float, set[str]] | None = None

    async def stream(self, model: str, req: ChatRequest, *, first_token: float, idle: float,
                     total: float) -> AsyncIterator[str | Final]:
        body = {"model": model, "messages": req.messages, "stream": True}
        opts = options_for(req)
        if opts:
            body["options"] = opts
        deadline = time.monotonic() + total
        produced, answered = 0, False
        try:
            resp, first_left = await open_stream(self.session, self.endpoint("/api/chat"), data=orjson.dumps(body),
                                                 headers={"Content-Type": "application/json"},
                                                 first_token=first_token, deadline=deadline)
            async with StreamedBody(resp, first_token=first_left, idle=idle, deadline=deadline) as answer:
                if resp.status != 200:
                    raise await error_body(resp)
                answered = True
                pending: list[str] = []  # the text of lines that arrived together: one piece
                async for line, more in answer.lines:
                    obj, bad = decode_event(line, "line")
                    if bad is not None:
                        if pending:  # what came before the bad line was delivered: say so first
                            yield "".join(pending)
                        raise bad
                    text = (obj.get("message") or {}).get("content") or ""
                    if text:
                        produced += 1
                        pending.append(text)
                    if pending and (not more or obj.get("done")):
                        yield "".join(pending)
                        pending.clear()
                    if obj.get("done"):
                        if not produced:
                            raise BackendError("empty", "HTTP 200 with an empty answer",
                                               usage=reported(int(obj.get("prompt_eval_count") or 0),
                                                              int(obj.get("eval_count") or 0)))
                        self._mark_loaded(model)
                        answer.complete = True
                        yield Final(obj.get("done_reason") or "stop", int(obj.get("prompt_eval_count") or 0),
                                    int(obj.get("eval_count") or 0),
                                    {k: obj[k] for k in ("total_duration", "load_duration", "prompt_eval_duration",
                                                         "eval_duration") if k in obj})
                        return
                if pending:
                    yield "".join(pending)
                raise BackendError("truncated", "the stream ended without a final `done` object")
        except BackendError as err:
            raise err.after_answer(answered) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise classify_client_error(exc).after_answer(answered) from None

    async def embed(self, model: str, inputs: list[str], *, timeout: float) -> tuple[list[list[float]], int]:
        answered = False
        try:
            async with self.session.post(self.endpoint("/api/embed"), json={"model": model, "input": inputs},
                                         timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect)) as resp:
                if resp.status != 200:
                    raise await error_body(resp)
                answered = True
                doc = embed_answer(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise classify_client_error(exc).after_answer(answered) from None
        return embeddings_of(doc, len(inputs))

    async def _get(self, path: str, timeout: float = 3.0) -> dict:
        try:
            async with self.session.get(self.endpoint(path), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    raise await error_body(resp)
                return orjson.loads(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise classify_client_error(exc) from None

    async def list_models(self) -> list[str]:
        return [m.get("name", "") for m in (await self._get("/api/tags")).get("models", [])]

    def _mark_loaded(self, model: str) -> None:
        if self._ps is not None:
            self._ps[1].add(model)

    async def is_loaded(self, model: str) -> bool | None:
        """From /api/ps, cached for two seconds; None if Ollama cannot say."""
        now = time.monotonic()
        if self._ps is None or now - self._ps[0] > 2.0:
            try:
                names = {m.get("name") or m.get("model") for m in (await self._get("/api/ps", 1.0)).get("models", [])}
            except BackendError:
                return None
            self._ps = (now, {n for n in names if n})
        return model in self._ps[1]

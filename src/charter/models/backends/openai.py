"""Any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, a cloud API): SSE streams with usage."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    reported,
)
from charter.models.types import BackendError, ChatRequest, Final


def output_limit_key(url: str) -> str:
    """The field that caps the answer's tokens: OpenAI's own API wants `max_completion_tokens` (newer
    models refuse `max_tokens`, and both at once is an error); other OpenAI-compatible servers (vLLM,
    llama.cpp, LM Studio, Ollama's /v1) read `max_tokens`."""
    host = (urlsplit(url).hostname or "").lower()
    official = host == "api.openai.com" or host.endswith((".openai.azure.com", ".openai.com"))
    return "max_completion_tokens" if official else "max_tokens"


def embeddings_of(doc: dict[str, Any], count: int) -> tuple[list[list[float]], int]:
    """The vectors (in `index` order) and prompt tokens of an `/embeddings` answer (see `embed_vectors`)."""
    data = doc.get("data")
    items = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
    items.sort(key=lambda d: d["index"] if isinstance(d.get("index"), int) else 0)
    usage = doc.get("usage")
    return embed_vectors([d.get("embedding") for d in items], count,
                         usage.get("prompt_tokens") if isinstance(usage, dict) else None)


class OpenAIBackend(HttpBackend):
    kind = "openai"

    def __init__(self, name: str, url: str, *, api_key_env: str | None = None, api_key_file: str | None = None,
                 connect: float = 2.0) -> None:
        super().__init__(name, url, connect=connect)
        self._key_env, self._key_file = api_key_env, api_key_file
        self.limit_key = output_limit_key(url)

    def _headers(self) -> dict[str, str]:
        """Headers with the API key; a backend that names a key it cannot find is not called at all."""
        headers = {"Content-Type": "application/json"}
        key = None
        if self._key_env:
            key = os.environ.get(self._key_env)
        if not key and self._key_file:
            try:
                key = Path(self._key_file).expanduser().read_text().strip()
            except OSError:
                key = None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self._key_env or self._key_file:
            where = f"${self._key_env}" if self._key_env else self._key_file
            raise BackendError("unconfigured", f"no API key: {where} is not set")
        return headers

    async def stream(self, model: str, req: ChatRequest, *, first_token: float, idle: float,
                     total: float) -> AsyncIterator[str | Final]:
        body: dict = {"model": model, "messages": req.messages, "stream": True,
                      "stream_options": {"include_usage": True}}
        if req.max_tokens is not None:  # the gateway always sets it: the limit its reservation was sized on
            body[self.limit_key] = req.max_tokens
        for key in ("temperature", "top_p", "seed", "stop"):
            v = getattr(req, key)
            if v is not None:
                body[key] = v
        deadline = time.monotonic() + total
        produced, finish, answered = 0, "stop", False
        usage: dict = {}
        try:
            resp, first_left = await open_stream(self.session, self.endpoint("/chat/completions"), data=orjson.dumps(body),
                                                 headers=self._headers(), first_token=first_token, deadline=deadline)
            async with StreamedBody(resp, first_token=first_left, idle=idle, deadline=deadline) as answer:
                if resp.status != 200:
                    raise await error_body(resp)
                answered = True
                pending: list[str] = []  # the text of events that arrived together: one piece
                async for line, more in answer.lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        if pending:
                            yield "".join(pending)
                        if not produced:
                            raise BackendError("empty", "HTTP 200 with an empty answer",
                                               usage=reported(int(usage.get("prompt_tokens") or 0),
                                                              int(usage.get("completion_tokens") or 0)))
                        answer.complete = True
                        yield Final(finish, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
                        return
                    chunk, bad = decode_event(data, "event")
                    if bad is not None:
                        if pending:  # what came before the bad event was delivered: say so first
                            yield "".join(pending)
                        raise bad
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            produced += 1
                            pending.append(text)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                    if pending and not more:
                        yield "".join(pending)
                        pending.clear()
                if pending:
                    yield "".join(pending)
                raise BackendError("truncated", "the stream ended without [DONE]")
        except BackendError as err:
            raise err.after_answer(answered) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise classify_client_error(exc).after_answer(answered) from None

    async def embed(self, model: str, inputs: list[str], *, timeout: float) -> tuple[list[list[float]], int]:
        answered = False
        try:
            async with self.session.post(self.endpoint("/embeddings"), data=orjson.dumps({"model": model, "input": inputs}),
                                         headers=self._headers(),
                                         timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect)) as resp:
                if resp.status != 200:
                    raise await error_body(resp)
                answered = True
                doc = embed_answer(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise classify_client_error(exc).after_answer(answered) from None
        return embeddings_of(doc, len(inputs))

    async def list_models(self) -> list[str]:
        try:
            async with self.session.get(self.endpoint("/models"), headers=self._headers(),
                                        timeout=aiohttp.ClientTimeout(total=3)) as resp:
                if resp.status != 200:
                    raise await error_body(resp)
                doc = orjson.loads(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise classify_client_error(exc) from None
        return [m.get("id", "") for m in doc.get("data", [])]

    async def is_loaded(self, model: str) -> bool | None:
        return None

"""The OpenAI and Ollama APIs, served by Charter so existing clients point at it unchanged.

Whatever backend answers, the client gets its own API's shapes: OpenAI chunks ending in
`data: [DONE]`, or Ollama NDJSON ending in `done: true`; and on failure an error in that API's
shape, never a silent truncation. Streams are opened only once the first piece of an answer
exists, so a failure before it can still become a proper HTTP error or an unseen failover.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask
from ulid import ULID

from charter import __version__
from charter.errors import CharterError
from charter.identity.registry import AgentRecord
from charter.identity.request_auth import verify_request
from charter.models.gateway import CallGovernor, Gateway
from charter.models.router import AllFailed, CallResult, MidstreamError, UnknownModel
from charter.models.types import ChatRequest, Final
from charter.node import Node
from charter.server.hangup import HangUpWatch
from charter.server.streaming import WatchedStream

OPENAI, OLLAMA = "openai", "ollama"

WENT_AWAY = "the client went away before the answer ended"  # the call event's error
STALLED = "the client stopped reading the answer"  # ... and was let go (timeouts.client_stall)


def _iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.details = status, message, code, kind, details


def _error_response(api: str, e: ApiError) -> Response:
    if api == OPENAI:
        body: dict[str, Any] = {"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}}
        if e.details:
            body["error"]["charter"] = e.details
    else:
        body = {"error": e.message}
    return Response(orjson.dumps(body), status_code=e.status, media_type="application/json")


def _from_charter(err: CharterError) -> ApiError:
    kind = {401: "authentication_error", 403: "permission_error", 402: "insufficient_quota"}.get(err.http_status,
                                                                                              "invalid_request_error")
    return ApiError(err.http_status, err.message, err.code, kind, err.details)


def _refusal(gov: CallGovernor, failed: AllFailed) -> ApiError:
    """Why nothing answered: budget and policy refusals named plainly; else the backends' failures."""
    if not any(a.outcome == "failed" for a in failed.attempts) and gov.refusals:
        budget = [r for r in gov.refusals if "budget" in r]
        if budget:
            free = gov.gw.node.gov.free_models(gov.agent)
            return ApiError(402, f"{budget[0]['reason']}. Free models still usable: {', '.join(free) or 'none'}",
                            "budget_exceeded", "insufficient_quota", {"refusals": gov.refusals, "free_models": free})
        return ApiError(403, "policy allows none of this alias's models for this agent: " + str(failed),
                        "policy_denied", "permission_error", {"refusals": gov.refusals})
    return ApiError(503, f"every backend failed: {failed}", "all_backends_failed", "api_error",
                    {"attempts": [a.to_dict() for a in failed.attempts]})


def _chat_request(body: dict[str, Any], api: str) -> ChatRequest:
    messages = body.get("messages")
    if api == OLLAMA and "prompt" in body:  # /api/generate
        messages = []
        if isinstance(body.get("system"), str) and body["system"]:
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": str(body.get("prompt") or "")})
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ApiError(400, "messages must be a list of {role, content} objects", "invalid_messages")
    if api == OPENAI:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop")
        opts: dict[str, Any] = {}
        temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    else:
        opts = dict(body.get("options") or {})
        max_tokens = opts.pop("num_predict", None)
        stop = opts.pop("stop", None)
        temperature, top_p, seed = opts.pop("temperature", None), opts.pop("top_p", None), opts.pop("seed", None)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        if api == OLLAMA and isinstance(max_tokens, int) and max_tokens < 0:
            max_tokens = None  # Ollama's -1: until the model stops
        else:
            raise ApiError(400, "max_tokens must be a positive integer", "invalid_max_tokens")
    if isinstance(stop, str):
        stop = [stop]
    return ChatRequest([{"role": m["role"], "content": m.get("content", "")} for m in messages], max_tokens,
                       temperature, top_p, stop, seed, opts)


def _meta(result: CallResult) -> dict[str, Any]:
    return {"backend": result.ref, "degraded": result.degraded,
            "fallbacks": [a.to_dict() for a in result.fallbacks], "continued_after": result.continued_after}


def add_gateway_routes(app: FastAPI, node: Node, gateway: Gateway) -> None:
    router = gateway.router

    def authenticate(request: Request, body: bytes) -> AgentRecord:
        header = request.headers.get("authorization") or ""
        if header.startswith("Charter "):
            raw = request.scope.get("raw_path") or request.scope["path"].encode()
            qs = request.scope.get("query_string") or b""
            target = raw.decode("latin-1") + ("?" + qs.decode("latin-1") if qs else "")
            return verify_request(header, request.method, target, body, node.lookup, node.request_guard)
        return node.agent_for_bearer(header)

    async def parse(request: Request) -> tuple[AgentRecord, dict[str, Any]]:
        body = await request.body()
        try:
            agent = authenticate(request, body)
        except CharterError as err:
            raise _from_charter(err) from None
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"body is not JSON: {exc}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object", "invalid_json")
        return agent, data

    def resolve(model: Any) -> tuple[str, list[str]]:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required", "model_required")
        try:
            return router.resolve(model)
        except UnknownModel:
            raise ApiError(404, f"model {model!r} not found; known: {', '.join(router.names())}",
                           "model_not_found") from None

    async def run_chat(api: str, request: Request, *, generate: bool = False) -> Response:
        try:
            agent, data = await parse(request)
            alias, chain = resolve(data.get("model"))
            req = _chat_request(data, api)
        except ApiError as e:
            return _error_response(api, e)
        which = router.config.inject_capsule.get(alias)
        if which:  # whichever model answers gets the same context
            context = await node.capsules.context(which, agent)
            req.messages = [{"role": "system", "content": context}, *req.messages]
        stream = bool(data.get("stream", api == OLLAMA))
        gov = gateway.governor(agent, alias)
        started = time.perf_counter()
        pieces = router.chat(alias, chain, req, gov)
        text, result = "", None
        async with HangUpWatch(request.receive) as hangup:  # until the stream begins, or the answer ends
            try:
                first = await anext(pieces)
            except AllFailed as failed:
                await gateway.record(agent, api, alias, req, gov, None, started, stream=stream, error=str(failed),
                                     attempts=failed.attempts)
                return _error_response(api, _refusal(gov, failed))
            except (MidstreamError, StopAsyncIteration) as exc:  # cannot happen before a first piece; be safe
                return _error_response(api, ApiError(503, str(exc), "all_backends_failed", "api_error"))

            async def all_pieces() -> AsyncIterator[str | CallResult]:
                yield first
                async for p in pieces:
                    yield p

            if not stream:
                try:
                    async for p in all_pieces():
                        if isinstance(p, CallResult):
                            result = p
                        else:
                            text += p
                except MidstreamError as exc:
                    await gateway.record(agent, api, alias, req, gov, None, started, stream=False, error=exc.reason,
                                         attempts=exc.attempts)
                    return _error_response(api, ApiError(502, f"the answer broke off: {exc.reason}",
                                                         "midstream_failure", "api_error"))
        if hangup.gone:  # the router's call was cancelled with the handler, and settled what went out
            await pieces.aclose()
            await gateway.record(agent, api, alias, req, gov, None, started, stream=stream, error=WENT_AWAY)
            return Response(status_code=499)  # (nobody reads it: nginx's code for a client that closed)
        model_name = data["model"]
        if not stream:
            assert result is not None
            # The answer's settlement is queued already; its call event is queued once the body is
            # sent. Both are done while a later call waits for its backend (Node.backend_call_ahead),
            # so the agent waits for neither the ledger, the signing nor the log write (see
            # docs/architecture.md, "The gateway").
            return Response(orjson.dumps(_whole(api, model_name, text, result, gov, generate)),
                            media_type="application/json",
                            background=BackgroundTask(gateway.record, agent, api, alias, req, gov, result, started,
                                                      stream=False))
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        encoder = _OpenAIStream(model_name, include_usage) if api == OPENAI else _OllamaStream(model_name, generate)
        outcome: dict[str, Any] = {}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for p in all_pieces():
                    if isinstance(p, CallResult):
                        outcome["result"] = p
                        yield encoder.final(p, gov)
                    else:
                        yield encoder.piece(p)
            except MidstreamError as exc:
                outcome["failed"] = exc
                yield encoder.error(f"the answer broke off and no backend could continue it: {exc.reason}")
            finally:  # closed early (the client left): the router settles or releases now
                await pieces.aclose()

        async def after() -> None:
            """The call event, once the last byte is sent, or once the agent went away mid-answer."""
            failed: MidstreamError | None = outcome.get("failed")
            result: CallResult | None = outcome.get("result")
            error = None
            if failed is not None:
                error = failed.reason
            elif result is None:  # (gone once the answer was complete: recorded as answered, either way)
                error = f"{STALLED} for {router.config.timeouts.client_stall:g}s" if response.stalled else WENT_AWAY
            await gateway.record(agent, api, alias, req, gov, result, started, stream=True, error=error,
                                 attempts=failed.attempts if failed else None)

        media = "text/event-stream" if api == OPENAI else "application/x-ndjson"
        response = WatchedStream(body(), media_type=media, headers={"Cache-Control": "no-store"},
                                 background=BackgroundTask(after), stall=router.config.timeouts.client_stall)
        return response

    @app.post("/v1/chat/completions", tags=["models"], summary="OpenAI chat completions (streaming or not)")
    async def openai_chat(request: Request) -> Response:
        return await run_chat(OPENAI, request)

    @app.post("/api/chat", tags=["models"], summary="Ollama chat (NDJSON streaming by default)")
    async def ollama_chat(request: Request) -> Response:
        return await run_chat(OLLAMA, request)

    @app.post("/api/generate", tags=["models"], summary="Ollama generate")
    async def ollama_generate(request: Request) -> Response:
        return await run_chat(OLLAMA, request, generate=True)

    async def run_embed(api: str, request: Request) -> Response:
        try:
            agent, data = await parse(request)
            alias, chain = resolve(data.get("model"))
            raw = data.get("input", data.get("prompt"))
            inputs = [raw] if isinstance(raw, str) else raw
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
                raise ApiError(400, "input must be a string or a list of strings", "invalid_input")
        except ApiError as e:
            return _error_response(api, e)
        gov = gateway.governor(agent, alias)
        started = time.perf_counter()
        try:
            ref, vectors, tokens, attempts = await router.embed(chain, inputs, gov)
        except AllFailed as failed:
            return _error_response(api, _refusal(gov, failed))
        ms = time.perf_counter() - started
        node.emit_soon("charter.models.calls", {
            "agent_id": agent.id, "name": agent.name, "api": api, "alias": alias, "kind": "embed", "backend": ref,
            "attempts": [a.to_dict() for a in attempts], "tokens_in": tokens, "cost_usd": gov.usd / 1e6,
            "latency_ms": round(ms * 1000, 2)})
        if api == OPENAI:
            return Response(orjson.dumps({
                "object": "list", "model": data["model"],
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}), media_type="application/json")
        if "prompt" in data and "input" not in data:  # legacy /api/embeddings
            return Response(orjson.dumps({"embedding": vectors[0]}), media_type="application/json")
        return Response(orjson.dumps({"model": data["model"], "embeddings": vectors, "total_duration": int(ms * 1e9),
                                      "load_duration": 0, "prompt_eval_count": tokens}), media_type="application/json")

    @app.post("/v1/embeddings", tags=["models"], summary="OpenAI embeddings")
    async def openai_embeddings(request: Request) -> Response:
        return await run_embed(OPENAI, request)

    @app.post("/api/embed", tags=["models"], summary="Ollama embed")
    async def ollama_embed(request: Request) -> Response:
        return await run_embed(OLLAMA, request)

    @app.post("/api/embeddings", tags=["models"], summary="Ollama legacy embeddings")
    async def ollama_embeddings(request: Request) -> Response:
        return await run_embed(OLLAMA, request)

    async def listing_auth(api: str, request: Request) -> Response | None:
        try:
            authenticate(request, b"")
        except CharterError as err:
            return _error_response(api, _from_charter(err))
        return None

    @app.get("/v1/models", tags=["models"], summary="OpenAI model list: aliases and backend/model names")
    async def openai_models(request: Request) -> Response:
        if (denied := await listing_auth(OPENAI, request)) is not None:
            return denied
        return Response(orjson.dumps({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "charter"} for n in router.names()]}),
            media_type="application/json")

    def _details(name: str) -> dict[str, Any]:
        alias = name in router.config.aliases
        return {"format": "charter", "family": "alias" if alias else name.split("/", 1)[0],
                "families": None, "parameter_size": "", "quantization_level": "",
                "parent_model": ""}

    @app.get("/api/tags", tags=["models"], summary="Ollama model list")
    async def ollama_tags(request: Request) -> Response:
        if (denied := await listing_auth(OLLAMA, request)) is not None:
            return denied
        import hashlib

        return Response(orjson.dumps({"models": [
            {"name": n, "model": n, "modified_at": "2026-01-01T00:00:00Z", "size": 0,
             "digest": hashlib.sha256(n.encode()).hexdigest(), "details": _details(n)} for n in router.names()]}),
            media_type="application/json")

    @app.get("/api/ps", tags=["models"], summary="Ollama: models loaded on the backends behind Charter")
    async def ollama_ps(request: Request) -> Response:
        if (denied := await listing_auth(OLLAMA, request)) is not None:
            return denied
        loaded = []
        for name in router.names():
            if "/" not in name:
                continue
            backend, model = name.split("/", 1)
            b = router.backends.get(backend)
            if b is not None and router.breakers[backend].state == "closed" and await b.is_loaded(model):
                loaded.append({"name": name, "model": name, "size": 0, "digest": "", "details": _details(name),
                               "expires_at": "2026-01-01T00:00:00Z", "size_vram": 0})
        return Response(orjson.dumps({"models": loaded}), media_type="application/json")

    @app.post("/api/show", tags=["models"], summary="Ollama: what a model name means here (its chain)")
    async def ollama_show(request: Request) -> Response:
        try:
            _, data = await parse(request)
            alias, chain = resolve(data.get("model") or data.get("name"))
        except ApiError as e:
            return _error_response(OLLAMA, e)
        return Response(orjson.dumps({"modelfile": "", "parameters": "", "template": "",
                                      "details": _details(alias),
                                      "model_info": {"charter.chain": chain}}), media_type="application/json")

    @app.get("/api/version", tags=["models"], summary="Ollama version endpoint")
    async def ollama_version() -> Response:
        return Response(orjson.dumps({"version": f"0.12.6-charter.{__version__}"}), media_type="application/json")

    @app.get("/v1/admin/models", tags=["operator"], summary="Backends, circuits and probes")
    async def models_health(request: Request) -> Response:
        header = request.headers.get("authorization") or ""
        if node.is_dashboard_token(header):
            who: AgentRecord | None = node.operator  # the dashboard's login token carries operator rights
        else:
            who = authenticate(request, b"") if header.startswith("Charter ") else None
        if who is None or who.id != "operator":
            raise CharterError("unauthorized", "this call is for the operator (root key) only", "authorization")
        return Response(orjson.dumps({"backends": router.health(), "aliases": router.config.aliases}),
                        media_type="application/json")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(OLLAMA if request.url.path.startswith("/api/") else OPENAI, exc)


def _whole(api: str, model: str, text: str, result: CallResult, gov: CallGovernor, generate: bool) -> dict[str, Any]:
    f = result.final
    usage_in, usage_out = gov.tokens_in or f.prompt_tokens, gov.tokens_out or f.completion_tokens
    if api == OPENAI:
        return {"id": f"chatcmpl-{ULID()}", "object": "chat.completion", "created": int(time.time()), "model": model,
                "system_fingerprint": "charter",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(f), "logprobs": None}],
                "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                          "total_tokens": usage_in + usage_out},
                "charter": _meta(result)}
    out: dict[str, Any] = {"model": model, "created_at": _iso_now()}
    if generate:
        out["response"] = text
    else:
        out["message"] = {"role": "assistant", "content": text}
    out.update(_ollama_final(f, usage_in, usage_out))
    out["charter"] = _meta(result)
    return out


def _finish(f: Final) -> str:
    return "length" if f.finish_reason == "length" else "stop"


def _ollama_final(f: Final, tin: int, tout: int) -> dict[str, Any]:
    raw = f.raw
    return {"done": True, "done_reason": f.finish_reason or "stop",
            "total_duration": raw.get("total_duration", 0), "load_duration": raw.get("load_duration", 0),
            "prompt_eval_count": tin, "prompt_eval_duration": raw.get("prompt_eval_duration", 0),
            "eval_count": tout, "eval_duration": raw.get("eval_duration", 0)}


class _OpenAIStream:
    def __init__(self, model: str, include_usage: bool) -> None:
        self.id, self.created, self.model = f"chatcmpl-{ULID()}", int(time.time()), model
        self.include_usage = include_usage
        self.started = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        doc = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "system_fingerprint": "charter",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        if self.include_usage:
            doc["usage"] = None
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def piece(self, text: str) -> bytes:
        if not self.started:
            self.started = True
            return self._chunk({"role": "assistant", "content": text})
        return self._chunk({"content": text})

    def final(self, result: CallResult, gov: CallGovernor) -> bytes:
        out = self._chunk({}, _finish(result.final), charter=_meta(result))
        if self.include_usage:
            tin, tout = gov.tokens_in, gov.tokens_out
            usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [], "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}}
            out += b"data: " + orjson.dumps(usage) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def error(self, message: str) -> bytes:
        doc = {"error": {"message": message, "type": "api_error", "param": None, "code": "midstream_failure"}}
        return b"data: " + orjson.dumps(doc) + b"\n\n"


class _OllamaStream:
    def __init__(self, model: str, generate: bool) -> None:
        self.model, self.generate = model, generate

    def _line(self, doc: dict[str, Any]) -> bytes:
        return orjson.dumps(doc) + b"\n"

    def piece(self, text: str) -> bytes:
        doc: dict[str, Any] = {"model": self.model, "created_at": _iso_now()}
        if self.generate:
            doc["response"] = text
        else:
            doc["message"] = {"role": "assistant", "content": text}
        doc["done"] = False
        return self._line(doc)

    def final(self, result: CallResult, gov: CallGovernor) -> bytes:
        doc: dict[str, Any] = {"model": self.model, "created_at": _iso_now()}
        if self.generate:
            doc["response"] = ""
        else:
            doc["message"] = {"role": "assistant", "content": ""}
        doc.update(_ollama_final(result.final, gov.tokens_in, gov.tokens_out))
        doc["charter"] = _meta(result)
        return self._line(doc)

    def error(self, message: str) -> bytes:
        return self._line({"error": message})

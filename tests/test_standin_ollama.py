"""The stand-in Ollama: its wire format, its token accounting, and every fault it can put on.

Everything goes over real sockets to a real process (`python -m charter.models.standin`), which
these tests also SIGKILL and SIGSTOP. One process serves the wire-format tests and the faults that
leave it running (each test resets it through the control port first); the faults that kill it,
close its port or are set from the command line get a process of their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any

import aiohttp
import pytest

from charter.models.standin import (
    FAULT_MODES,
    MIDSTREAM_EOF,
    QUEUE_FULL,
    RUNNER_TERMINATED,
    StandinOllama,
    StandinProcess,
    count_tokens,
    parse_keep_alive,
    spawn_standin,
    split_tokens,
)

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

LLAMA = "llama3.2:3b"
QWEN = "qwen2.5:0.5b"
TOKEN_DELAY = 0.001
LOAD_DELAY = 0.02
TIMEOUT = aiohttp.ClientTimeout(total=10)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


def control(proc: StandinProcess, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call /__standin/<path> on the control port (synchronously)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(proc.control_url + "/__standin/" + path, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    with _NO_PROXY.open(req, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def shared() -> Iterator[StandinProcess]:
    proc = spawn_standin(control_port=True, token_delay=TOKEN_DELAY, load_delay=LOAD_DELAY)
    yield proc
    proc.stop()


@pytest.fixture
def ollama(shared: StandinProcess) -> StandinProcess:
    """The shared stand-in, reset: no fault, no counts, nothing loaded, default delays."""
    assert shared.alive(), "the shared stand-in died"
    control(shared, "config", {"token_delay": TOKEN_DELAY, "load_delay": LOAD_DELAY, "keep_alive": "5m"})
    control(shared, "reset", {})
    return shared


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def set_fault(http: aiohttp.ClientSession, proc: StandinProcess, mode: str, **kw: Any) -> dict[str, Any]:
    async with http.post(proc.control_url + "/__standin/fault", json={"mode": mode, **kw}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def state(http: aiohttp.ClientSession, proc: StandinProcess) -> dict[str, Any]:
    async with http.get(proc.control_url + "/__standin/state") as r:
        return await r.json()


async def ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in resp.content if line.strip()]


async def sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE body, checking the blank line after each event."""
    text = await resp.text()
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text
    return [e[len("data: ") :] for e in events]


def chat_body(content: str, model: str = LLAMA, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def check_final(final: dict[str, Any], *, generate: bool) -> None:
    """The done object: every field present, integer nanoseconds that add up."""
    assert final["done"] is True
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0 and final["load_duration"] > 0
    assert final["total_duration"] >= final["load_duration"] + final["prompt_eval_duration"] + final["eval_duration"]
    assert final["done_reason"] in ("stop", "length")
    assert isinstance(final["created_at"], str) and final["created_at"].endswith("Z")
    datetime.fromisoformat(final["created_at"][:26] + "+00:00")
    if generate:
        assert isinstance(final["context"], list)
        assert len(final["context"]) == final["prompt_eval_count"] + final["eval_count"]
    else:
        assert "context" not in final


# ---------------------------------------------------------------------------------------------
# pure functions


def test_tokens_round_trip_and_keep_alive_parsing() -> None:
    text = "Hello, world!  It's 3.5 o'clock — fine."
    assert "".join(split_tokens(text)) == text
    assert count_tokens(text) == len(split_tokens(text)) == 16  # Hello , world ! It ' s 3 . 5 o ' clock — fine .
    assert count_tokens("") == 0
    assert parse_keep_alive(None) == 300.0
    assert parse_keep_alive("5m") == 300.0
    assert parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(0) == 0.0 and parse_keep_alive("0") == 0.0
    assert parse_keep_alive(-1) == math.inf and parse_keep_alive("-1m") == math.inf
    assert parse_keep_alive(12) == 12.0
    with pytest.raises(ValueError, match="invalid duration"):
        parse_keep_alive("soon")


# ---------------------------------------------------------------------------------------------
# wire format of each route


async def test_root_version_and_unknown_routes(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async with http.get(ollama.url + "/") as r:
        assert r.status == 200 and await r.text() == "Ollama is running"
    async with http.head(ollama.url + "/") as r:
        assert r.status == 200
    async with http.get(ollama.url + "/api/version") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert set(await r.json()) == {"version"}
    for method, path in (("GET", "/api/nothing"), ("GET", "/api/generate"), ("POST", "/api/tags")):
        async with http.request(method, ollama.url + path) as r:
            assert (r.status, await r.text()) == (404, "404 page not found")


async def test_tags_show_and_v1_models(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async with http.get(ollama.url + "/api/tags") as r:
        models = (await r.json())["models"]
    assert [m["name"] for m in models] == [LLAMA, QWEN]
    for m in models:
        assert m["model"] == m["name"]
        assert isinstance(m["size"], int) and m["size"] > 0 and len(m["digest"]) == 64
        datetime.fromisoformat(m["modified_at"].replace("Z", "+00:00"))
        assert set(m["details"]) >= {"format", "family", "families", "parameter_size", "quantization_level"}
        assert m["details"]["format"] == "gguf"
    assert models[0]["details"]["family"] == "llama" and models[0]["details"]["parameter_size"] == "3.2B"

    async with http.post(ollama.url + "/api/show", json={"model": QWEN}) as r:
        show = await r.json()
    assert set(show) >= {"modelfile", "parameters", "template", "details", "model_info", "capabilities"}
    assert show["details"]["family"] == "qwen2" and "completion" in show["capabilities"]
    assert show["model_info"]["qwen2.embedding_length"] == 896
    async with http.post(ollama.url + "/api/show", json={"model": "ghost"}) as r:
        assert r.status == 404 and await r.json() == {"error": "model 'ghost:latest' not found"}

    async with http.get(ollama.url + "/v1/models") as r:
        listing = await r.json()
    assert listing["object"] == "list"
    assert [(d["id"], d["object"], d["owned_by"]) for d in listing["data"]] == [
        (LLAMA, "model", "library"),
        (QWEN, "model", "library"),
    ]
    assert all(isinstance(d["created"], int) for d in listing["data"])
    async with http.get(ollama.url + f"/v1/models/{LLAMA}") as r:
        assert (await r.json())["id"] == LLAMA
    async with http.get(ollama.url + "/v1/models/ghost") as r:
        body = await r.json()
        assert r.status == 404 and body["error"]["type"] == "not_found_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_generate_stream_wire_format_and_counts(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    prompt = "Why is the sky blue? Answer briefly."
    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": prompt, "system": "Be terse."}) as r:
        assert r.status == 200 and r.content_type == "application/x-ndjson"
        assert r.headers.get("Transfer-Encoding") == "chunked"
        lines = await ndjson(r)
    *chunks, final = lines
    assert chunks, "no token chunks"
    for c in chunks:
        assert set(c) == {"model", "created_at", "response", "done"} and c["done"] is False and c["model"] == LLAMA
    text = "".join(c["response"] for c in chunks)
    assert text.strip() and final["response"] == ""
    check_final(final, generate=True)
    assert final["done_reason"] == "stop"
    assert final["eval_count"] == len(chunks) == count_tokens(text)
    assert final["prompt_eval_count"] == count_tokens(prompt) + count_tokens("Be terse.")
    assert final["eval_duration"] >= 0.8 * final["eval_count"] * TOKEN_DELAY * 1e9
    assert final["load_duration"] >= 0.8 * LOAD_DELAY * 1e9  # first use: a cold load

    # Same request again: same text, and now the model is warm.
    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": prompt, "system": "Be terse.", "stream": False}) as r:
        assert r.content_type == "application/json"
        whole = await r.json()
    assert whole["response"] == text and whole["context"] == final["context"]
    check_final(whole, generate=True)
    assert whole["load_duration"] < final["load_duration"]

    # A different prompt gives a different answer.
    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "Something else", "stream": False}) as r:
        assert (await r.json())["response"] != text


async def test_chat_stream_and_non_stream(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers."},
        {"role": "assistant", "content": "Nile, Amazon, Danube."},
        {"role": "user", "content": "And three more?"},
    ]
    expected_prompt = sum(count_tokens(m["content"]) for m in messages)
    async with http.post(ollama.url + "/api/chat", json={"model": QWEN, "messages": messages}) as r:
        assert r.content_type == "application/x-ndjson"
        *chunks, final = await ndjson(r)
    for c in chunks:
        assert set(c) == {"model", "created_at", "message", "done"} and c["done"] is False
        assert set(c["message"]) == {"role", "content"} and c["message"]["role"] == "assistant"
    text = "".join(c["message"]["content"] for c in chunks)
    assert final["message"] == {"role": "assistant", "content": ""}
    check_final(final, generate=False)
    assert final["prompt_eval_count"] == expected_prompt
    assert final["eval_count"] == len(chunks) == count_tokens(text)

    async with http.post(ollama.url + "/api/chat", json={"model": QWEN, "messages": messages, "stream": False}) as r:
        whole = await r.json()
    assert whole["message"] == {"role": "assistant", "content": text}
    check_final(whole, generate=False)
    assert (whole["prompt_eval_count"], whole["eval_count"]) == (expected_prompt, final["eval_count"])


async def test_num_predict_stop_echo_and_length_directive(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async def chat(content: str, **options: Any) -> dict[str, Any]:
        async with http.post(ollama.url + "/api/chat", json=chat_body(content, stream=False, options=options)) as r:
            return await r.json()

    echoed = await chat("echo: The quick brown fox, jumps.")
    assert echoed["message"]["content"] == "The quick brown fox, jumps."
    assert echoed["eval_count"] == 7 and echoed["done_reason"] == "stop"

    long = await chat("Tell me a story [[tokens=60]]")
    assert long["eval_count"] == 60 == count_tokens(long["message"]["content"])
    capped = await chat("Tell me a story [[tokens=60]]", num_predict=5)
    assert capped["done_reason"] == "length" and capped["eval_count"] == 5
    assert capped["message"]["content"] == "".join(split_tokens(long["message"]["content"])[:5])
    not_reached = await chat("Tell me a story [[tokens=60]]", num_predict=100)
    assert not_reached["done_reason"] == "stop" and not_reached["eval_count"] == 60

    stopped = await chat("echo: alpha beta gamma delta", stop=["gamma"])
    # Text up to the stop sequence, as Ollama truncates it; the token that hit it was still evaluated.
    assert stopped["message"]["content"] == "alpha beta " and stopped["done_reason"] == "stop"
    assert stopped["eval_count"] == 3

    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "x [[tokens=9]]", "options": {"num_predict": 4}}) as r:
        *chunks, final = await ndjson(r)
    assert len(chunks) == 4 and final["eval_count"] == 4 and final["done_reason"] == "length"

    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "list it", "format": "json", "stream": False}) as r:
        assert isinstance(json.loads((await r.json())["response"]), dict)


async def test_load_unload_and_ps(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async def ps() -> dict[str, dict[str, Any]]:
        async with http.get(ollama.url + "/api/ps") as r:
            return {m["name"]: m for m in (await r.json())["models"]}

    assert await ps() == {}
    async with http.post(ollama.url + "/api/chat", json={"model": LLAMA, "messages": []}) as r:
        assert r.content_type == "application/json"
        loaded = await r.json()
    assert loaded == {"model": LLAMA, "created_at": loaded["created_at"], "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": True}
    entry = (await ps())[LLAMA]
    assert set(entry) >= {"name", "model", "size", "digest", "details", "expires_at", "size_vram"}
    assert entry["size_vram"] == entry["size"] > 0
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    assert 250 < (expires - datetime.now(timezone.utc)).total_seconds() <= 300  # keep_alive 5m

    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "", "keep_alive": 0}) as r:
        unloaded = await r.json()
    assert unloaded["done_reason"] == "unload" and unloaded["response"] == "" and unloaded["done"] is True
    assert await ps() == {}

    async with http.post(ollama.url + "/api/generate", json={"model": QWEN, "prompt": ""}) as r:
        assert (await r.json())["done_reason"] == "load"
    assert set(await ps()) == {QWEN}

    # First use loads too; a short keep_alive unloads it by itself; keep_alive 0 at once.
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", keep_alive=0.8, stream=False)) as r:
        assert r.status == 200
    assert set(await ps()) == {LLAMA, QWEN}
    await asyncio.sleep(1.0)
    assert set(await ps()) == {QWEN}
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", model=QWEN, keep_alive="0", stream=False)) as r:
        assert r.status == 200
    assert await ps() == {}

    # Negative keep_alive: loaded for good.
    async with http.post(ollama.url + "/api/chat", json={"model": QWEN, "messages": [], "keep_alive": -1}) as r:
        assert r.status == 200
    assert datetime.fromisoformat((await ps())[QWEN]["expires_at"].replace("Z", "+00:00")).year > 2200
    async with http.post(ollama.url + "/api/chat", json={"model": QWEN, "messages": [], "keep_alive": "soon"}) as r:
        assert r.status == 400 and "invalid duration" in (await r.json())["error"]


async def test_native_errors(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    missing = {"error": 'model "ghost" not found, try pulling it first'}
    for path, body in (
        ("/api/generate", {"model": "ghost", "prompt": "hi"}),
        ("/api/chat", chat_body("hi", model="ghost")),
        ("/api/embed", {"model": "ghost", "input": "hi"}),
        ("/api/embeddings", {"model": "ghost", "prompt": "hi"}),
    ):
        async with http.post(ollama.url + path, json=body) as r:
            assert (r.status, await r.json()) == (404, missing), path
    async with http.post(ollama.url + "/api/chat", data=b"{not json") as r:
        assert r.status == 400 and "error" in await r.json()
    async with http.post(ollama.url + "/api/chat", data=b"") as r:
        assert r.status == 400 and "error" in await r.json()
    async with http.post(ollama.url + "/api/generate", json={"prompt": "hi"}) as r:
        assert (r.status, await r.json()) == (400, {"error": "model is required"})


async def test_embeddings(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async with http.post(ollama.url + "/api/embed", json={"model": QWEN, "input": ["the red river", "the red river flows", "quiet copper"]}) as r:
        out = await r.json()
    assert out["model"] == QWEN and len(out["embeddings"]) == 3
    assert out["prompt_eval_count"] == 3 + 4 + 2
    assert isinstance(out["total_duration"], int) and isinstance(out["load_duration"], int)
    a, b, c = out["embeddings"]
    assert len(a) == len(b) == len(c) == 896
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-4 for v in (a, b, c))

    def cos(u: list[float], v: list[float]) -> float:
        return sum(x * y for x, y in zip(u, v, strict=True))

    assert cos(a, b) > cos(a, c)  # shared words, closer vectors
    async with http.post(ollama.url + "/api/embed", json={"model": QWEN, "input": "the red river"}) as r:
        assert (await r.json())["embeddings"] == [a]  # deterministic
    async with http.post(ollama.url + "/api/embed", json={"model": QWEN, "input": "the red river", "dimensions": 64}) as r:
        assert len((await r.json())["embeddings"][0]) == 64

    async with http.post(ollama.url + "/api/embeddings", json={"model": QWEN, "prompt": "the red river"}) as r:
        legacy = await r.json()
    assert set(legacy) == {"embedding"} and legacy["embedding"] == a

    async with http.post(ollama.url + "/v1/embeddings", json={"model": QWEN, "input": ["the red river", "quiet copper"]}) as r:
        v1 = await r.json()
    assert v1["object"] == "list" and v1["model"] == QWEN
    assert [(d["object"], d["index"]) for d in v1["data"]] == [("embedding", 0), ("embedding", 1)]
    assert v1["data"][0]["embedding"] == a and v1["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    async with http.post(ollama.url + "/v1/embeddings", json={"model": QWEN, "input": "the red river", "encoding_format": "base64"}) as r:
        packed = base64.b64decode((await r.json())["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(a)}f", packed)) == a
    async with http.post(ollama.url + "/v1/embeddings", json={"model": QWEN, "input": []}) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_v1_chat_non_stream(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    body = chat_body("Name a colour.", model=QWEN)
    async with http.post(ollama.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.content_type == "application/json"
        out = await r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["system_fingerprint"] == "fp_ollama" and out["model"] == QWEN and isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    async with http.post(ollama.url + "/api/chat", json={**body, "stream": False}) as r:
        native = await r.json()
    assert choice["message"]["content"] == native["message"]["content"]  # the same model underneath
    assert out["usage"] == {
        "prompt_tokens": native["prompt_eval_count"],
        "completion_tokens": native["eval_count"],
        "total_tokens": native["prompt_eval_count"] + native["eval_count"],
    }
    async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("x [[tokens=30]]", max_tokens=3)) as r:
        capped = await r.json()
    assert capped["choices"][0]["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 3


async def test_v1_chat_stream_with_and_without_usage(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    body = chat_body("Stream something.", stream=True, stream_options={"include_usage": True})
    async with http.post(ollama.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = await sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *content, last, usage = chunks
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["system_fingerprint"] == "fp_ollama"
    for c in content:
        [choice] = c["choices"]
        assert choice["finish_reason"] is None and choice["delta"]["role"] == "assistant"
        assert "usage" not in c
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["delta"]["content"] == ""
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": count_tokens("Stream something."),
        "completion_tokens": count_tokens(text),
        "total_tokens": count_tokens("Stream something.") + count_tokens(text),
    }

    async with http.post(ollama.url + "/v1/chat/completions", json={**body, "stream_options": None}) as r:
        events = await sse(r)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] for e in events[:-1])  # no usage chunk
    assert "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]) == text


async def test_v1_completions_and_errors(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async with http.post(ollama.url + "/v1/completions", json={"model": LLAMA, "prompt": "Once upon a time"}) as r:
        out = await r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == 4
    body = {"model": LLAMA, "prompt": "Once upon a time", "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(ollama.url + "/v1/completions", json=body) as r:
        events = await sse(r)
    assert events[-1] == "[DONE]"
    *_, usage = (json.loads(e) for e in events[:-1])
    assert usage["choices"] == [] and usage["usage"] == out["usage"]

    def v1_error(status: int, kind: str) -> Any:
        return lambda r, b: r.status == status and set(b["error"]) == {"message", "type", "param", "code"} and b["error"]["type"] == kind

    for body, ok in (
        (chat_body("hi", model="ghost"), v1_error(404, "not_found_error")),
        ({"model": LLAMA, "messages": []}, v1_error(400, "invalid_request_error")),
        ({"model": LLAMA, "messages": [{"role": "user", "content": 5}]}, v1_error(400, "invalid_request_error")),
    ):
        async with http.post(ollama.url + "/v1/chat/completions", json=body) as r:
            assert ok(r, await r.json()), body
    async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("hi", model="ghost")) as r:
        assert (await r.json())["error"]["message"] == 'model "ghost" not found, try pulling it first'


async def test_state_counts_requests_per_path(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    for _ in range(3):
        async with http.get(ollama.url + "/api/tags") as r:
            assert r.status == 200
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
        assert r.status == 200
    st = await state(http, ollama)
    assert st["requests"] == {"/api/tags": 3, "/api/chat": 1}
    assert st["fault"]["mode"] == "none" and st["pid"] == ollama.pid and st["listening"] is True
    assert st["loaded"] == [LLAMA]


# ---------------------------------------------------------------------------------------------
# faults that leave the process running


@pytest.mark.parametrize(
    ("mode", "status", "message"),
    [("http500", 500, RUNNER_TERMINATED), ("http503", 503, QUEUE_FULL), ("http429", 429, "too many requests")],
)
async def test_http_error_faults(ollama: StandinProcess, http: aiohttp.ClientSession, mode: str, status: int, message: str) -> None:
    described = await set_fault(http, ollama, mode, count=3)
    assert described["fault"]["mode"] == mode and described["fault"]["count"] == 3
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi")) as r:
        assert (r.status, await r.json()) == (status, {"error": message})
    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False}) as r:
        assert (r.status, await r.json()) == (status, {"error": message})
    async with http.get(ollama.url + "/") as r:  # the health check lies
        assert r.status == 200 and await r.text() == "Ollama is running"
    async with http.get(ollama.url + "/api/tags") as r:
        assert r.status == 200
    async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        body = await r.json()
        assert r.status == status
        assert body == {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    # The count ran out: the next one goes through, and the fault shows as cleared.
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
        assert r.status == 200
    st = await state(http, ollama)
    assert st["fault"]["mode"] == "none" and st["requests"]["/api/chat"] == 2


async def test_fault_paths_filter_and_bad_fault(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    await set_fault(http, ollama, "http500", paths=["/api/embed"])
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
        assert r.status == 200
    async with http.post(ollama.url + "/api/embed", json={"model": LLAMA, "input": "hi"}) as r:
        assert r.status == 500
    async with http.post(ollama.url + "/__standin/fault", json={"mode": "gremlins"}) as r:
        assert r.status == 400 and "unknown fault mode" in (await r.json())["error"]
    assert set(FAULT_MODES) >= {"exit", "hang", "refuse", "http500", "http503", "http429", "empty", "error_midstream"}
    assert set(FAULT_MODES) >= {"slow_first_token", "disconnect_midstream", "malformed"}


async def test_empty_fault_is_a_200_with_nothing_in_it(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    await set_fault(http, ollama, "empty")
    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "Describe the image.", "stream": False}) as r:
        out = await r.json()
    assert r.status == 200 and out["response"] == "" and out["done"] is True and out["done_reason"] == "stop"
    assert out["prompt_eval_count"] == count_tokens("Describe the image.")
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi")) as r:
        lines = await ndjson(r)
    assert r.status == 200 and len(lines) == 1 and lines[0]["done"] is True and lines[0]["message"]["content"] == ""
    async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        out = await r.json()
    assert r.status == 200 and out["choices"][0]["message"]["content"] == ""
    async with http.get(ollama.url + "/") as r:
        assert await r.text() == "Ollama is running"
    async with http.get(ollama.url + "/api/ps") as r:
        assert [m["name"] for m in (await r.json())["models"]] == [LLAMA]  # still "loaded"


async def test_error_midstream(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    await set_fault(http, ollama, "error_midstream", after=3)
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi [[tokens=20]]")) as r:
        assert r.status == 200 and r.content_type == "application/x-ndjson"
        lines = await ndjson(r)
    assert len(lines) == 4 and all(line["done"] is False for line in lines[:3])
    assert lines[-1] == {"error": MIDSTREAM_EOF} and "done" not in lines[-1]

    async with http.post(ollama.url + "/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False}) as r:
        assert (r.status, await r.json()) == (500, {"error": MIDSTREAM_EOF})

    async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("hi [[tokens=20]]", stream=True)) as r:
        assert r.status == 200
        events = await sse(r)
    assert len(events) == 4 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["message"] == MIDSTREAM_EOF

    # Before any content, Ollama can still set the status.
    await set_fault(http, ollama, "error_midstream", after=0)
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi")) as r:
        assert (r.status, await r.json()) == (500, {"error": MIDSTREAM_EOF})
    async with http.get(ollama.url + "/") as r:
        assert r.status == 200


async def test_disconnect_midstream(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    await set_fault(http, ollama, "disconnect_midstream", after=2)
    got: list[dict[str, Any]] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(ollama.url + "/api/chat", json=chat_body("hi [[tokens=20]]")) as r:
            assert r.status == 200
            async for line in r.content:
                got.append(json.loads(line))
    assert len(got) == 2 and not any(g["done"] for g in got)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("hi [[tokens=20]]", stream=True)) as r:
            await r.read()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
            await r.read()
    async with http.get(ollama.url + "/") as r:
        assert r.status == 200


async def test_malformed(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    await set_fault(http, ollama, "malformed")
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi")) as r:
        assert r.status == 200
        raw = [line for line in (await r.text()).split("\n") if line]
    json.loads(raw[0])  # one good chunk, then garbage
    bad = 0
    for line in raw[1:]:
        with pytest.raises(ValueError):
            json.loads(line)
        bad += 1
    assert bad >= 2
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
        assert r.status == 200
        with pytest.raises(ValueError):
            json.loads(await r.text())


async def test_slow_first_token_is_a_cold_load(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async with http.post(ollama.url + "/api/chat", json={"model": LLAMA, "messages": []}) as r:
        assert (await r.json())["done_reason"] == "load"
    await set_fault(http, ollama, "slow_first_token", count=1, seconds=0.6)
    started = time.monotonic()
    first_at: list[float] = []

    async def call() -> list[dict[str, Any]]:
        async with http.post(ollama.url + "/api/chat", json=chat_body("hi")) as r:
            first_at.append(time.monotonic() - started)  # headers come with the first token
            return await ndjson(r)

    task = asyncio.create_task(call())
    await asyncio.sleep(0.25)
    assert not first_at
    async with http.get(ollama.url + "/api/ps") as r:
        assert (await r.json())["models"] == []  # evicted, loading
    async with http.get(ollama.url + "/") as r:
        assert r.status == 200
    lines = await task
    assert first_at[0] >= 0.55
    assert lines[-1]["done"] is True and lines[-1]["load_duration"] >= 0.55e9
    async with http.get(ollama.url + "/api/ps") as r:
        assert [m["name"] for m in (await r.json())["models"]] == [LLAMA]
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
        assert (await r.json())["load_duration"] < 0.1e9  # warm now, fault used up


async def test_hang_while_health_answers(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    await set_fault(http, ollama, "hang")
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(ollama.url + "/api/chat", json=chat_body("hi"), timeout=aiohttp.ClientTimeout(total=0.4)) as r:
            await r.read()
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(ollama.url + "/v1/chat/completions", json=chat_body("hi"), timeout=aiohttp.ClientTimeout(total=0.3)) as r:
            await r.read()
    for path in ("/", "/api/version", "/api/tags", "/api/ps"):
        async with http.get(ollama.url + path) as r:
            assert r.status == 200, path
    await set_fault(http, ollama, "none")
    async with http.post(ollama.url + "/api/chat", json=chat_body("hi", stream=False)) as r:
        assert r.status == 200


async def test_cpu_fallback(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    async with http.post(ollama.url + "/api/chat", json=chat_body("x [[tokens=10]]", stream=False)) as r:
        fast = await r.json()
    await set_fault(http, ollama, "cpu_fallback")
    async with http.post(ollama.url + "/api/chat", json=chat_body("x [[tokens=10]]", stream=False)) as r:
        slow = await r.json()
    assert slow["message"] == fast["message"]
    assert fast["eval_duration"] >= 10 * TOKEN_DELAY * 1e9 and slow["eval_duration"] >= 0.9 * 10 * 10 * TOKEN_DELAY * 1e9
    async with http.get(ollama.url + "/api/ps") as r:
        [entry] = (await r.json())["models"]
    assert entry["size_vram"] == 0 and entry["size"] > 0


# ---------------------------------------------------------------------------------------------
# faults that take the process or its port down, and real signals


async def test_exit_fault_ends_the_process(http: aiohttp.ClientSession) -> None:
    with spawn_standin(token_delay=TOKEN_DELAY) as proc:
        async with http.post(proc.control_url + "/__standin/fault", json={"mode": "exit", "code": 3}) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(proc.url + "/") as r:
                await r.read()
        assert proc.wait(5) == 3
        with pytest.raises(aiohttp.ClientConnectorError):
            async with http.get(proc.url + "/") as r:
                await r.read()


async def test_refuse_then_clear_through_the_control_port(http: aiohttp.ClientSession) -> None:
    with spawn_standin(control_port=True, token_delay=TOKEN_DELAY) as proc:
        assert proc.control_port and proc.control_port != proc.port
        async with http.get(proc.url + "/") as r:  # leaves a pooled keep-alive connection
            assert r.status == 200
        async with http.post(proc.control_url + "/__standin/fault", json={"mode": "refuse"}) as r:
            assert r.status == 200
        await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientConnectionError):  # the open connection was dropped too
            async with http.get(proc.url + "/") as r:
                await r.read()
        for path in ("/", "/api/tags"):
            with pytest.raises(aiohttp.ClientConnectorError):
                async with http.get(proc.url + path) as r:
                    await r.read()
        st = await state(http, proc)
        assert st["listening"] is False and st["fault"]["mode"] == "refuse"
        await set_fault(http, proc, "none")
        async with http.get(proc.url + "/") as r:
            assert r.status == 200
        assert proc.alive()


async def test_refuse_for_some_seconds_set_through_the_main_port(http: aiohttp.ClientSession) -> None:
    with spawn_standin(token_delay=TOKEN_DELAY) as proc:
        async with http.post(proc.url + "/__standin/fault", json={"mode": "refuse", "seconds": 1.0}) as r:
            assert r.status == 200
        await asyncio.sleep(0.15)
        with pytest.raises(aiohttp.ClientConnectorError):
            async with http.get(proc.url + "/") as r:
                await r.read()
        await asyncio.sleep(1.1)
        async with http.get(proc.url + "/") as r:
            assert r.status == 200
        assert (await state(http, proc))["fault"]["mode"] == "none"


async def test_fault_from_the_command_line(http: aiohttp.ClientSession) -> None:
    with spawn_standin(fault="http503", fault_count=1, models=["mistral", "nomic-embed-text"]) as proc:
        async with http.post(proc.url + "/api/chat", json=chat_body("hi", model="mistral")) as r:
            assert (r.status, await r.json()) == (503, {"error": QUEUE_FULL})
        async with http.post(proc.url + "/api/chat", json=chat_body("hi", model="mistral", stream=False)) as r:
            assert r.status == 200 and (await r.json())["model"] == "mistral:latest"
        async with http.post(proc.url + "/api/embed", json={"model": "nomic-embed-text", "input": "hi"}) as r:
            assert len((await r.json())["embeddings"][0]) == 768
        async with http.post(proc.url + "/api/chat", json=chat_body("hi", model="nomic-embed-text")) as r:
            assert r.status == 400
    with spawn_standin(fault="refuse", fault_seconds=1.0) as proc:
        with pytest.raises(aiohttp.ClientConnectorError):
            async with http.get(proc.url + "/") as r:
                await r.read()
        await asyncio.sleep(1.1)
        async with http.get(proc.url + "/") as r:
            assert r.status == 200


async def test_sigkill_midstream_and_after(http: aiohttp.ClientSession) -> None:
    proc = spawn_standin(token_delay=0.02)
    try:
        got = 0
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(proc.url + "/api/chat", json=chat_body("long [[tokens=200]]")) as r:
                async for _ in r.content:
                    got += 1
                    if got == 3:
                        proc.kill()
        assert 3 <= got < 200
        assert not proc.alive()
        with pytest.raises(aiohttp.ClientConnectorError):
            async with http.get(proc.url + "/") as r:
                await r.read()
    finally:
        proc.stop()


async def test_sigstop_hangs_everything_until_sigcont(http: aiohttp.ClientSession) -> None:
    with spawn_standin(token_delay=0.01) as proc:
        async with http.post(proc.url + "/api/chat", json=chat_body("long [[tokens=40]]")) as stream:
            first = json.loads(await stream.content.readline())
            assert first["done"] is False
            proc.suspend()
            try:
                # The kernel still accepts connections; nothing answers, not even `/`.
                with pytest.raises(asyncio.TimeoutError):
                    async with http.get(proc.url + "/", timeout=aiohttp.ClientTimeout(total=0.4)) as r:
                        await r.read()
                # The stream stalls: drain what was already on its way, then nothing more comes.
                drained: list[bytes] = []
                with pytest.raises(asyncio.TimeoutError):
                    while True:
                        line = await asyncio.wait_for(stream.content.readline(), 0.3)
                        assert line, "the stream ended while the process was stopped"
                        drained.append(line)
                assert len(drained) < 39
            finally:
                proc.resume()
            rest = [json.loads(line) async for line in stream.content if line.strip()]
        assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 40
        assert 1 + len(drained) + len(rest) == 41
        async with http.get(proc.url + "/") as r:
            assert r.status == 200


async def test_in_process_server(http: aiohttp.ClientSession) -> None:
    server = StandinOllama(["llama3.2:1b"], token_delay=0)
    port = await server.start("127.0.0.1", 0)
    try:
        assert server.url == f"http://127.0.0.1:{port}"
        async with http.post(server.url + "/api/generate", json={"model": "llama3.2:1b", "prompt": "echo: hi there", "stream": False}) as r:
            assert (await r.json())["response"] == "hi there"
        await server.apply_fault("http500", count=1)
        async with http.post(server.url + "/api/generate", json={"model": "llama3.2:1b", "prompt": "x"}) as r:
            assert r.status == 500
        assert server.state()["requests"]["/api/generate"] == 2 and server.fault.mode == "none"
    finally:
        await server.stop()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with http.get(server.url + "/") as r:
            await r.read()


# ---------------------------------------------------------------------------------------------
# the official clients


async def test_official_ollama_client(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    ollama_lib = pytest.importorskip("ollama")
    client = ollama_lib.AsyncClient(host=ollama.url)
    listed = await client.list()
    assert [m.model for m in listed.models] == [LLAMA, QWEN]
    assert listed.models[0].details.family == "llama" and listed.models[0].size > 0
    shown = await client.show(QWEN)
    assert shown.details.family == "qwen2" and "completion" in (shown.capabilities or [])

    reply = await client.chat(model=LLAMA, messages=[{"role": "user", "content": "echo: hello there"}])
    assert reply.message.content == "hello there" and reply.done and reply.done_reason == "stop"
    assert reply.eval_count == 2 and reply.prompt_eval_count == count_tokens("echo: hello there")
    parts = [p async for p in await client.chat(model=LLAMA, messages=[{"role": "user", "content": "x [[tokens=12]]"}], stream=True)]
    assert parts[-1].done and parts[-1].eval_count == 12 == len(parts) - 1
    gen = await client.generate(model=QWEN, prompt="Why?", options={"num_predict": 3})
    assert gen.done_reason == "length" and gen.eval_count == 3 and len(gen.context or []) == gen.prompt_eval_count + 3
    emb = await client.embed(model=QWEN, input=["a", "b"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 896
    ps = await client.ps()
    assert {m.model for m in ps.models} == {LLAMA, QWEN} and all(m.size_vram and m.expires_at for m in ps.models)

    with pytest.raises(ollama_lib.ResponseError) as missing:
        await client.chat(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "not found, try pulling it first" in missing.value.error

    await set_fault(http, ollama, "error_midstream", count=1)
    seen = 0
    with pytest.raises(ollama_lib.ResponseError, match="unexpected EOF"):
        async for _ in await client.chat(model=LLAMA, messages=[{"role": "user", "content": "x [[tokens=12]]"}], stream=True):
            seen += 1
    assert seen == 3
    await set_fault(http, ollama, "http500", count=1)
    with pytest.raises(ollama_lib.ResponseError) as crashed:
        await client.generate(model=QWEN, prompt="hi")
    assert crashed.value.status_code == 500 and crashed.value.error == RUNNER_TERMINATED


async def test_official_openai_client(ollama: StandinProcess, http: aiohttp.ClientSession) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=ollama.url + "/v1", api_key="ollama", max_retries=0)
    try:
        done = await client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "echo: one two three"}])
        assert done.choices[0].message.content == "one two three" and done.choices[0].finish_reason == "stop"
        assert done.system_fingerprint == "fp_ollama" and done.usage is not None and done.usage.completion_tokens == 3

        stream = await client.chat.completions.create(
            model=LLAMA, messages=[{"role": "user", "content": "x [[tokens=15]]"}], stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert count_tokens("".join(c.choices[0].delta.content or "" for c in chunks[:-1])) == 15

        capped = await client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "x [[tokens=15]]"}], max_tokens=4)
        assert capped.choices[0].finish_reason == "length" and capped.usage is not None and capped.usage.completion_tokens == 4

        models = [m.id async for m in client.models.list()]
        assert models == [LLAMA, QWEN]
        emb = await client.embeddings.create(model=QWEN, input=["the red river"])  # base64 on the wire
        async with http.post(ollama.url + "/api/embed", json={"model": QWEN, "input": "the red river"}) as r:
            native = (await r.json())["embeddings"][0]
        assert emb.data[0].embedding == pytest.approx(native, abs=1e-7)

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
        await set_fault(http, ollama, "http500", count=1)
        with pytest.raises(openai.InternalServerError, match="llama runner process has terminated"):
            await client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "hi"}])
        await set_fault(http, ollama, "http429", count=1)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "hi"}])
        await set_fault(http, ollama, "error_midstream", count=1)
        got = 0
        with pytest.raises(openai.APIError, match="unexpected EOF"):
            async for _ in await client.chat.completions.create(
                model=QWEN, messages=[{"role": "user", "content": "x [[tokens=15]]"}], stream=True
            ):
                got += 1
        assert got == 3
    finally:
        await client.close()

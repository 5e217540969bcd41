"""A backend's session serves every agent, so it must carry nothing from one call into the next.

Cloud APIs set cookies on their answers (a load balancer's affinity cookie, for one). A session
that kept them would send one agent's cookie along with every other agent's call to that backend.
A real aiohttp server plays an OpenAI-compatible backend that sets a cookie on every answer and
notes every cookie it is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from charter.models.backends.ollama import OllamaBackend
from charter.models.backends.openai import OpenAIBackend
from charter.models.types import ChatRequest, Final

pytestmark = pytest.mark.anyio


class CookieSettingBackend:
    def __init__(self) -> None:
        self.cookies_seen: list[str] = []
        self.calls = 0
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_post("/api/chat", self.ollama_chat)
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # By name: aiohttp's default jar ignores cookies from a bare IP address, not from a host name.
        return f"http://localhost:{port}"

    def _note(self, request: web.Request, response: web.StreamResponse) -> None:
        self.calls += 1
        if "Cookie" in request.headers:
            self.cookies_seen.append(request.headers["Cookie"])
        response.set_cookie("affinity", f"agent-call-{self.calls}", path="/")

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self._note(request, resp)
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        self._note(request, resp)
        await resp.prepare(request)
        await resp.write(orjson.dumps({"message": {"role": "assistant", "content": "hi"}, "done": False}) + b"\n")
        await resp.write(orjson.dumps({"message": {"role": "assistant", "content": ""}, "done": True,
                                       "done_reason": "stop", "prompt_eval_count": 2, "eval_count": 1}) + b"\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[CookieSettingBackend, str]]:
    backend = CookieSettingBackend()
    url = await backend.start()
    yield backend, url
    await backend.runner.cleanup()


async def answer(backend: OpenAIBackend | OllamaBackend) -> str:
    text = ""
    async for piece in backend.stream("m", ChatRequest(messages=[{"role": "user", "content": "hi"}]),
                                      first_token=5, idle=5, total=10):
        if not isinstance(piece, Final):
            text += piece
    return text


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_a_cookie_one_answer_set_is_not_sent_on_the_next_call(server: tuple[CookieSettingBackend, str],
                                                                    kind: str) -> None:
    fake, url = server
    backend = OpenAIBackend("b", url + "/v1") if kind == "openai" else OllamaBackend("b", url)
    try:
        for _ in range(3):
            assert await answer(backend) == "hi"
        assert fake.calls == 3
        assert fake.cookies_seen == []  # each answer set one; no call sent any back
    finally:
        await backend.close()

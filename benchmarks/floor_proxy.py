"""The floor under any gateway built like Charter's: the same hop with nothing governed.

Not part of Charter: a baseline for `gateway.py`. A raw ASGI app on uvicorn (httptools, uvloop),
as the daemon is served, that forwards `POST /v1/chat/completions` to one OpenAI-compatible
backend with aiohttp and, like Charter's router, always asks the backend for a stream (that is
how a hung or failing backend is noticed before the whole answer would have been due):

* a streamed request gets the backend's SSE bytes relayed as they arrive;
* a whole-answer request gets the stream read to its end, and its pieces joined into one
  chat.completion document.

No identity, policy, budget, event, breaker, metrics or error handling: what is left is what the
HTTP server, the HTTP client and the stream itself cost. The latency Charter adds beyond this
proxy's is what its governance costs.

    python benchmarks/floor_proxy.py --upstream http://127.0.0.1:PORT/v1 --port N
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import orjson
import uvicorn

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]


class FloorProxy:
    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.http: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["method"] != "POST":  # GET /health: the benchmark's readiness check
            await send({"type": "http.response.start", "status": 200, "headers": JSON})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = orjson.loads(body)
        stream = bool(req.get("stream"))
        req.update(stream=True, stream_options={"include_usage": True})
        assert self.http is not None
        async with self.http.post(self.url, data=orjson.dumps(req), headers={"Content-Type": "application/json"}) as r:
            if stream:
                await send({"type": "http.response.start", "status": r.status, "headers": SSE})
                async for chunk in r.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            raw = await r.read()  # the whole stream, then its events: the least work a whole answer takes
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish = "stop"
        for line in raw.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = orjson.loads(data)
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                pieces.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
        doc = {"id": "chatcmpl-floor", "object": "chat.completion", "model": req.get("model"),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                            "finish_reason": finish}], "usage": usage}
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": orjson.dumps(doc)})

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                # as the daemon's backends: one pool, no cookies shared between callers
                self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                  cookie_jar=aiohttp.DummyCookieJar())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.http is not None:
                    await self.http.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="the backend's OpenAI-compatible base URL, ending in /v1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    # the daemon's settings (charter.server.daemon) where they touch the hot path
    uvicorn.run(FloorProxy(args.upstream), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=75, proxy_headers=False)


if __name__ == "__main__":
    main()

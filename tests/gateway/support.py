"""Helpers for the gateway tests: a configurable fleet, the official clients, call events, stand-in control.

Everything goes over real sockets: a real daemon (`charter up`) in front of stand-in Ollama processes,
reached with the unmodified `openai` and `ollama` client libraries (and raw HTTP where a client hides
what is on the wire, such as the `charter` metadata the `ollama` client's typed responses drop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
import openai

from charter.config import Home
from charter.encoding import canonical, sha256_hex
from charter.models.standin import StandinProcess, spawn_standin, spawn_standin_async
from charter.server.daemon import stop
from tests.conftest import Daemon, start_daemon
from tests.gateway.conftest import Fleet, gateway_home

PRIMARY = "primary/llama3.2:3b"
BACKUP = "backup/qwen2.5:0.5b"
OPENAI, OLLAMA = "openai", "ollama"
TOKEN_DELAY = 0.001  # the stand-ins' seconds per token
# A connection aborted mid-answer loses whatever the reader had not taken yet (aiohttp raises the
# payload error ahead of buffered lines), so how many tokens got out before it is a race. Tokens this
# far apart make sure some did; tests then accept any prefix of the ones sent.
SPACED = 0.02
APIS = (OPENAI, OLLAMA)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# fleets


def fleet_home(root: Path, primary: int, backup: int, *, midstream: str = "continue", first_token: str = "1.5s",
               cold_first_token: str = "6s", idle: str = "1s", cooldown: str = "1s", max_cooldown: str = "4s",
               client_stall: str = "1m", probe: str = "1s", aliases: dict[str, list[str]] | None = None,
               prices: dict[str, tuple[float, float]] | None = None) -> Home:
    """`gateway_home` with the timeouts it does not expose, extra aliases and extra prices."""
    home = gateway_home(root, primary, backup, midstream=midstream, first_token=first_token, cooldown=cooldown,
                        probe=probe)
    text = home.config_path.read_text()
    for key, value in (("cold_first_token", cold_first_token), ("idle", idle), ("max_cooldown", max_cooldown),
                       ("client_stall", client_stall)):
        text, n = re.subn(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', text)
        assert n == 1, key
    if aliases:
        lines = "".join(f"{name} = {json.dumps(chain)}\n" for name, chain in aliases.items())
        text = text.replace("[models.aliases]\n", "[models.aliases]\n" + lines, 1)
    if prices:
        lines = "".join(f'"{ref}" = {{ input_per_mtok = {i}, output_per_mtok = {o} }}\n'
                        for ref, (i, o) in prices.items())
        assert "[prices]\n" in text
        text = text.replace("[prices]\n", "[prices]\n" + lines, 1)
    home.config_path.write_text(text)
    return home


def start(root: Path, *, primary_models: list[str] | None = None, **kw: Any) -> Fleet:
    """Two stand-in processes (primary, backup) and a daemon in front of them."""
    primary = spawn_standin(models=primary_models or ["llama3.2:3b"], control_port=True, token_delay=TOKEN_DELAY)
    backup = spawn_standin(models=["qwen2.5:0.5b"], control_port=True, token_delay=TOKEN_DELAY)
    try:
        home = fleet_home(root, primary.port, backup.port, **kw)
        return Fleet(home, start_daemon(home), primary, backup)
    except BaseException:
        primary.stop()
        backup.stop()
        raise


def finish(fleet: Fleet) -> None:
    stop(fleet.home)
    for p in (fleet.primary, fleet.backup):
        p.stop()


async def respawn(old: StandinProcess, models: list[str]) -> StandinProcess:
    """A new stand-in process on the same port as a dead (or to-be-killed) one."""
    old.kill()
    old.stop()
    return await spawn_standin_async(port=old.port, models=models, control_port=True, token_delay=TOKEN_DELAY)


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a loop of its own (for sync, module-scoped fixtures)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()  # type: ignore[arg-type]


def enroll_key(daemon: Daemon, name: str, role: str = "worker") -> str:
    """Enrol an agent and return only its bearer key (what unmodified clients use)."""
    async def go() -> str:
        agent = await daemon.enroll(name, role)
        try:
            assert agent.api_key
            return agent.api_key
        finally:
            await agent.close()
    return run_sync(go)


# ---------------------------------------------------------------------------------------------
# the stand-in's control endpoint


async def standin(proc: StandinProcess, what: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """`/__standin/<what>` on the control port: GET without a body, POST with one."""
    url = f"{proc.control_url}/__standin/{what}"
    async with httpx.AsyncClient(trust_env=False, timeout=5) as h:
        r = await (h.get(url) if body is None else h.post(url, json=body))
    r.raise_for_status()
    return r.json()


async def fault(proc: StandinProcess, mode: str, count: int | None = None, **params: Any) -> None:
    await standin(proc, "fault", {"mode": mode, "count": count, **params})


async def space_tokens(proc: StandinProcess, seconds: float = SPACED) -> None:
    await standin(proc, "config", {"token_delay": seconds})


async def chat_requests(proc: StandinProcess) -> int:
    return int((await standin(proc, "state"))["requests"].get("/api/chat", 0))


# ---------------------------------------------------------------------------------------------
# the operator's view: circuits and events


async def circuits(daemon: Daemon) -> dict[str, dict[str, Any]]:
    doc = await daemon.admin("GET", "/v1/admin/models")
    return {b["backend"]: b for b in doc["backends"]}


async def wait_for(check: Callable[[], Awaitable[T]], timeout: float, what: str, every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def wait_circuit(daemon: Daemon, backend: str, state: str = "closed", timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        c = (await circuits(daemon))[backend]
        return c if c["state"] == state else None
    return await wait_for(check, timeout, f"{backend}'s circuit to be {state}")


async def model_events(daemon: Daemon, limit: int = 500) -> list[dict[str, Any]]:
    """Recent `charter.models.>` events, oldest first: {seq, subject, payload}."""
    doc = await daemon.admin("GET", "/v1/events", params={"pattern": "charter.models.>", "limit": limit})
    return [{"seq": e["seq"], "subject": e["envelope"]["subject"], "payload": e["envelope"]["payload"]}
            for e in doc["events"]]


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    """What a call event carries instead of the prompt (log_content is off by default)."""
    return sha256_hex(canonical([{"role": m["role"], "content": m.get("content", "")} for m in messages]))


async def call_event(daemon: Daemon, messages: list[dict[str, Any]], timeout: float = 5.0) -> dict[str, Any]:
    """The latest call event for exactly these messages (a streamed call records after its last chunk)."""
    want = prompt_hash(messages)

    async def check() -> dict[str, Any] | None:
        found = [e["payload"] for e in await model_events(daemon, 200)
                 if e["subject"] == "charter.models.calls" and e["payload"].get("prompt_sha256") == want]
        return found[-1] if found else None
    return await wait_for(check, timeout, "the call event")


async def health_events(daemon: Daemon, backend: str, after_seq: int = 0) -> list[dict[str, Any]]:
    return [{"seq": e["seq"], **e["payload"]} for e in await model_events(daemon)
            if e["subject"] == "charter.models.health" and e["payload"]["backend"] == backend and e["seq"] > after_seq]


async def last_seq(daemon: Daemon) -> int:
    events = await model_events(daemon, 1)
    return events[-1]["seq"] if events else 0


# ---------------------------------------------------------------------------------------------
# the two official clients, one shape for their answers


@dataclass
class Reply:
    text: str
    finish: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    charter: dict[str, Any] | None  # the gateway's metadata, where the client keeps unknown fields (openai)
    chunks: int = 1


class Clients:
    """`openai.AsyncOpenAI` and `ollama.AsyncClient` pointed at the daemon, with an agent's bearer key.

    The OpenAI client's own retries are off: a failed request must show as failed, not be retried away.
    """

    def __init__(self, url: str, key: str, timeout: float = 30.0) -> None:
        self.url, self.key = url, key
        self.openai = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)
        self.ollama = ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    async def close(self) -> None:
        await self.openai.close()
        await self.ollama.close()

    async def chat(self, api: str, model: str, messages: list[dict[str, Any]], *, stream: bool,
                   max_tokens: int | None = None) -> Reply:
        if api == OPENAI:
            return await self._openai(model, messages, stream, max_tokens)
        return await self._ollama(model, messages, stream, max_tokens)

    async def _openai(self, model: str, messages: list[dict[str, Any]], stream: bool, max_tokens: int | None) -> Reply:
        extra: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
        if not stream:
            r = await self.openai.chat.completions.create(model=model, messages=messages, **extra)  # type: ignore[arg-type]
            u = r.usage
            return Reply(r.choices[0].message.content or "", r.choices[0].finish_reason,
                         u.prompt_tokens if u else None, u.completion_tokens if u else None,
                         (r.model_extra or {}).get("charter"))
        s = await self.openai.chat.completions.create(model=model, messages=messages, stream=True,  # type: ignore[arg-type]
                                                      stream_options={"include_usage": True}, **extra)
        reply = Reply("", None, None, None, None, 0)
        async for ch in s:
            reply.chunks += 1
            if ch.choices:
                reply.text += ch.choices[0].delta.content or ""
                if ch.choices[0].finish_reason:
                    reply.finish = ch.choices[0].finish_reason
            if (ch.model_extra or {}).get("charter"):
                reply.charter = ch.model_extra["charter"]  # type: ignore[index]
            if ch.usage:
                reply.prompt_tokens, reply.completion_tokens = ch.usage.prompt_tokens, ch.usage.completion_tokens
        return reply

    async def _ollama(self, model: str, messages: list[dict[str, Any]], stream: bool, max_tokens: int | None) -> Reply:
        options = None if max_tokens is None else {"num_predict": max_tokens}
        if not stream:
            r = await self.ollama.chat(model=model, messages=messages, stream=False, options=options)
            assert r.done is True
            return Reply(r.message.content or "", r.done_reason, r.prompt_eval_count, r.eval_count, None)
        reply = Reply("", None, None, None, None, 0)
        async for part in await self.ollama.chat(model=model, messages=messages, stream=True, options=options):
            assert reply.finish is None, "a part after the done part"
            reply.chunks += 1
            reply.text += part.message.content or ""
            if part.done:
                reply.finish = part.done_reason
                reply.prompt_tokens, reply.completion_tokens = part.prompt_eval_count, part.eval_count
        return reply


def assert_well_formed(reply: Reply, *, usage: bool = True) -> None:
    """Non-empty text, a proper finish, and usage; streams of more than one chunk end properly."""
    assert reply.text.strip(), reply
    assert reply.finish in ("stop", "length"), reply
    assert reply.prompt_tokens is not None and reply.completion_tokens is not None, reply
    if usage:
        assert reply.prompt_tokens > 0 and reply.completion_tokens > 0, reply


async def raw_ollama(url: str, key: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """An Ollama API call over plain HTTP: every NDJSON line (or the one JSON object) as sent."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as h:
        r = await h.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def direct_chat(proc: StandinProcess, model: str, messages: list[dict[str, Any]]) -> str:
    """Ask a stand-in itself (not through Charter): its answer is deterministic in the messages."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as h:
        r = await h.post(proc.url + "/api/chat", json={"model": model, "messages": messages, "stream": False})
    r.raise_for_status()
    return r.json()["message"]["content"]


WARM_UP = [{"role": "user", "content": "warm up"}]


async def heal(fleet: Fleet, clients: Clients, primary_models: list[str] | None = None) -> None:
    """Both backends back to health: alive, faults cleared, token delay restored, circuits closed,
    failure counts at zero.

    A direct call to each (`backend/model`) zeroes its count of consecutive failures, so a case
    starts from a closed circuit that one more soft failure cannot open.
    """
    if not fleet.primary.alive():
        fleet.primary = await respawn(fleet.primary, primary_models or ["llama3.2:3b"])
    else:
        fleet.primary.resume()
    for proc in (fleet.primary, fleet.backup):
        await standin(proc, "reset", {})
        await standin(proc, "config", {"token_delay": TOKEN_DELAY})
    for backend in ("primary", "backup"):
        await wait_circuit(fleet.daemon, backend, "closed")
    for ref in (PRIMARY, BACKUP):
        await clients.chat(OLLAMA, ref, WARM_UP, stream=False)
    state = await circuits(fleet.daemon)
    assert state["primary"]["failures"] == 0 and state["backup"]["failures"] == 0, state

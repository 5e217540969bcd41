"""Model calls can never spend more than their budget, and go through the same checks as any spend.

Through the real daemon and the stand-in Ollama, whose token counts are real (`[[tokens=N]]` in a
prompt makes the natural answer N tokens long, and it stops at `num_predict` / `max_tokens`):

* a request that sets no maximum is answered with at most `default_max_tokens` (256 here): the
  backend, `ollama` and `openai` kinds alike, is sent the limit the reservation was sized on;
* calls until the budget refuses, in USD (a paid `openai` backend) and in tokens (a free `ollama`
  one): what is booked never passes the cap, it equals the spend rows, and nothing overran;
* a prompt of punctuation (one token per byte) is not under-reserved;
* the per-tier cap applies to model calls (a priced `ollama` backend is a paid model, T2, capped at $2);
* an amount rule in the policy sees the call's estimated `amount_usd`;
* each rung's decision is in the call event.

The home adds `cloud`, an `openai` backend on the backup stand-in's `/v1`, priced like the backup
($0.001 a token), and a first rule to the default policy that denies a model call over $2.50 (above the default T2 cap of $2, so that both
can be seen).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from charter.models.standin import spawn_standin
from tests.conftest import start_daemon
from tests.gateway.conftest import Fleet
from tests.gateway.support import (
    APIS,
    BACKUP,
    OLLAMA,
    OPENAI,
    PRIMARY,
    TOKEN_DELAY,
    Clients,
    Reply,
    assert_well_formed,
    call_event,
    enroll_key,
    fault,
    finish,
    fleet_home,
    standin,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLOUD = "cloud/qwen2.5:0.5b"
DEFAULT_MAX = 256  # default_max_tokens in the gateway tests' charter.toml
TOTAL = 20.0  # [models.timeouts] total in the gateway tests' charter.toml
CLIENT_STALL = 5.0  # seconds a streaming client may leave a chunk untaken (longer than any test's pause)
LONG = "[[tokens=1000]]"  # the stand-in's natural answer to this prompt is 1000 tokens
DEAR_RULE = '''[[rules]]
id = "dear-calls"
action = "model.call"
when = "amount_usd > 2.5"
effect = "deny"
tier = "T2"
reason = "one model call may not cost more than $2.50"

'''


@dataclass
class Spend:
    fleet: Fleet

    @property
    def url(self) -> str:
        return self.fleet.daemon.url

    async def limit(self, agent: str, unit: str, amount: float) -> None:
        await self.fleet.daemon.admin("PUT", "/v1/admin/budget",
                                      json={"scope": f"agent:{agent}", "unit": unit, "period": "day", "limit": amount})

    async def usage(self, agent: str, unit: str) -> dict[str, Any]:
        rows = (await self.fleet.daemon.admin("GET", "/v1/admin/budget"))["budgets"]
        (row,) = [r for r in rows if r["name"] == agent and r["unit"] == unit]
        return row

    async def history(self, agent: str) -> dict[str, Any]:
        doc = await self.fleet.daemon.admin("GET", "/v1/admin/budget/history", params={"by": "agent", "agent": agent})
        (row,) = doc["history"]
        return row

    async def alerts(self, agent: str) -> list[dict[str, Any]]:
        doc = await self.fleet.daemon.admin("GET", "/v1/events", params={"pattern": "charter.budget.alerts",
                                                                         "limit": 1000})
        return [e["envelope"]["payload"] for e in doc["events"] if e["envelope"]["payload"].get("name") == agent]


@pytest.fixture(scope="module")
def spend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spend]:
    primary = spawn_standin(models=["llama3.2:3b"], control_port=True, token_delay=TOKEN_DELAY)
    backup = spawn_standin(models=["qwen2.5:0.5b"], control_port=True, token_delay=TOKEN_DELAY)
    fleet = None
    try:
        home = fleet_home(tmp_path_factory.mktemp("spend") / "home", primary.port, backup.port, probe="1h",
                          client_stall=f"{CLIENT_STALL:g}s",
                          prices={BACKUP: (1000.0, 1000.0), CLOUD: (1000.0, 1000.0)},
                          aliases={"paid_first": [BACKUP, PRIMARY], "cloud_only": [CLOUD]})
        text = home.config_path.read_text()
        cloud = f'[models.backends.cloud]\nkind = "openai"\nurl = "http://127.0.0.1:{backup.port}/v1"\n\n'
        home.config_path.write_text(text.replace("[models.aliases]\n", cloud + "[models.aliases]\n", 1))
        policy = home.policies_dir / "default.toml"
        text = policy.read_text()
        first = text.index("[[rules]]")
        policy.write_text(text[:first] + DEAR_RULE + text[first:])
        fleet = Fleet(home, start_daemon(home), primary, backup)
        yield Spend(fleet)
    finally:
        if fleet is not None:
            finish(fleet)
        else:
            primary.stop()
            backup.stop()


@pytest.fixture
async def agent_clients(spend: Spend, request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Clients]]:
    """A fresh agent per test (its own budget), named after the test."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:].strip("-")
    c = Clients(spend.url, enroll_key(spend.fleet.daemon, name))
    yield name, c
    await c.close()


def refused(exc: BaseException) -> int | None:
    """The HTTP status of a refusal from either client, or None if `exc` is not one."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code
    if isinstance(exc, ollama.ResponseError):
        return exc.status_code
    return None


async def until_refused(clients: Clients, api: str, alias: str, tag: str, *, stream: bool = False,
                        most: int = 12) -> list[Reply]:
    """Calls without a maximum, each asking for a 1000-token answer, until the budget says no."""
    replies = []
    for i in range(most):
        try:
            replies.append(await clients.chat(api, alias, [{"role": "user", "content": f"{LONG} {tag} {i}"}],
                                              stream=stream))
        except (openai.APIStatusError, ollama.ResponseError) as exc:
            assert refused(exc) == 402, exc
            return replies
    raise AssertionError(f"{most} calls and the budget never refused")


@pytest.mark.parametrize(("api", "stream"), [(a, s) for a in APIS for s in (False, True)],
                         ids=[f"{a}-{'stream' if s else 'whole'}" for a in APIS for s in (False, True)])
async def test_a_request_without_a_maximum_gets_the_reserved_one(spend: Spend, agent_clients: tuple[str, Clients],
                                                                 api: str, stream: bool) -> None:
    name, clients = agent_clients
    messages = [{"role": "user", "content": f"{LONG} how long may this be, {api} {stream}?"}]
    reply = await clients.chat(api, "strict", messages, stream=stream)
    assert_well_formed(reply)
    assert reply.completion_tokens == DEFAULT_MAX and reply.finish == "length"  # num_predict reached the backend
    ev = await call_event(spend.fleet.daemon, messages)
    assert ev["backend"] == PRIMARY and ev["tokens_out"] == DEFAULT_MAX


async def test_usd_spend_never_passes_the_cap_on_a_paid_openai_backend(spend: Spend,
                                                                       agent_clients: tuple[str, Clients]) -> None:
    name, clients = agent_clients
    await spend.limit(name, "usd", 1.0)
    replies = await until_refused(clients, OPENAI, "cloud_only", name)
    use, spent = await spend.usage(name, "usd"), await spend.history(name)
    assert spent["usd_micros"] <= use["hard"] == 1_000_000  # what was really spent stayed within the cap
    assert use["committed"] == spent["usd_micros"] and use["over"] == 0  # and the books say the same
    assert len(replies) >= 2  # ~$0.33 reserved a call: the cap admits a few before it refuses
    assert all(r.completion_tokens == DEFAULT_MAX and r.finish == "length" for r in replies)  # max_tokens was sent
    billed = sum(r.prompt_tokens + r.completion_tokens for r in replies)  # type: ignore[operator]
    assert spent["usd_micros"] == billed * 1000 and spent["calls"] == len(replies)
    assert spent["overruns"] == 0 and not [a for a in await spend.alerts(name) if a.get("kind") == "overrun"]


async def test_token_spend_never_passes_the_cap_on_a_free_ollama_backend(spend: Spend,
                                                                         agent_clients: tuple[str, Clients]) -> None:
    name, clients = agent_clients
    await spend.limit(name, "tokens", 1200)
    replies = await until_refused(clients, OLLAMA, "strict", name, stream=True)
    use, spent = await spend.usage(name, "tokens"), await spend.history(name)
    assert spent["tokens_in"] + spent["tokens_out"] <= use["hard"] == 1200
    assert use["committed"] == spent["tokens_in"] + spent["tokens_out"] and use["over"] == 0
    assert len(replies) >= 2 and all(r.completion_tokens == DEFAULT_MAX for r in replies)
    assert spent["overruns"] == 0 and spent["usd_micros"] == 0


async def test_a_prompt_of_one_token_per_byte_is_not_under_reserved(spend: Spend,
                                                                     agent_clients: tuple[str, Clients]) -> None:
    name, clients = agent_clients
    await spend.limit(name, "usd", 1.0)
    messages = [{"role": "user", "content": "!" * 400}]
    reply = await clients.chat(OPENAI, "cloud_only", messages, stream=False, max_tokens=4)
    assert reply.prompt_tokens is not None and reply.prompt_tokens >= 400  # the stand-in counts each "!"
    spent = await spend.history(name)
    assert spent["overruns"] == 0 and spent["tokens_in"] == reply.prompt_tokens
    assert not [a for a in await spend.alerts(name) if a.get("kind") == "overrun"]


async def test_the_tier_cap_applies_to_model_calls(spend: Spend, agent_clients: tuple[str, Clients]) -> None:
    """The priced backup is an `ollama` backend with a price: a paid model (T2) by the default policy,
    whose per-action cap is $2. A call that could cost more is skipped for the free primary."""
    name, clients = agent_clients
    messages = [{"role": "user", "content": "a priced local model, please"}]
    small = await clients.chat(OPENAI, "paid_first", messages, stream=False, max_tokens=8)  # ~$0.05: under the cap
    assert_well_formed(small)
    ev = await call_event(spend.fleet.daemon, messages)
    assert ev["backend"] == BACKUP and ev["cost_usd"] > 0
    assert ev["decisions"] == [{"ref": BACKUP, "effect": "allow", "rule": "paid-models", "tier": "T2"}]

    large = [{"role": "user", "content": "a priced local model, at length"}]
    reply = await clients.chat(OPENAI, "paid_first", large, stream=False, max_tokens=2200)  # up to ~$2.3
    assert_well_formed(reply)
    ev = await call_event(spend.fleet.daemon, large)
    assert ev["backend"] == PRIMARY and ev["cost_usd"] == 0
    (skipped,) = ev["fallbacks"]
    assert skipped["ref"] == BACKUP and skipped["outcome"] == "skipped"
    assert "one T2 action may reserve at most $2" in skipped["reason"]
    backup, primary = ev["decisions"]
    assert (backup["ref"], backup["effect"], backup["code"], backup["tier"]) == (BACKUP, "deny", "budget_exceeded", "T2")
    assert primary == {"ref": PRIMARY, "effect": "allow", "rule": "local-models", "tier": "T1"}


async def test_an_amount_rule_sees_the_calls_estimated_cost(spend: Spend, agent_clients: tuple[str, Clients]) -> None:
    name, clients = agent_clients
    cheap = [{"role": "user", "content": "a cheap paid call"}]
    reply = await clients.chat(OPENAI, "cloud_only", cheap, stream=False, max_tokens=8)  # ~$0.07: allowed
    assert_well_formed(reply)
    ev = await call_event(spend.fleet.daemon, cheap)
    assert ev["backend"] == CLOUD and ev["decisions"] == [
        {"ref": CLOUD, "effect": "allow", "rule": "paid-models", "tier": "T2"}]

    dear = [{"role": "user", "content": "a dear paid call"}]
    with pytest.raises(openai.APIStatusError) as caught:  # up to 3000 tokens out: over $3, over the rule's $2.50
        await clients.chat(OPENAI, "cloud_only", dear, stream=False, max_tokens=3000)
    assert caught.value.status_code == 403
    assert "one model call may not cost more than $2.50" in caught.value.message
    ev = await call_event(spend.fleet.daemon, dear)
    (decision,) = ev["decisions"]
    assert (decision["effect"], decision["rule"], decision["code"]) == ("deny", "dear-calls", "policy_denied")


FAILED_RUNGS = {  # fault on the priced backup -> (how the event names it, whether the backup is paid)
    "empty": ("empty", True),  # HTTP 200 with no text, its usage reported (the GPU-reset lie)
    "malformed": ("malformed", True),  # HTTP 200, then garbage before any token: nothing reported
    "http500": ("runner_error", False),  # the runner's error as HTTP 500: nothing was answered
}


@pytest.mark.parametrize("mode", list(FAILED_RUNGS))
async def test_a_paid_rung_that_fails_is_paid_for_only_if_it_had_begun_its_answer(
        spend: Spend, agent_clients: tuple[str, Clients], mode: str) -> None:
    """The priced backup fails and the free primary answers. A backend that had begun its answer
    (HTTP 200) had read the prompt, and a paid API bills it: that rung is booked, at the usage it
    reported if it did, else at the prompt's bound. One that refused the request is owed nothing.
    Whatever is booked, the ledger and the call event agree."""
    name, clients = agent_clients
    await spend.limit(name, "usd", 5.0)
    kind, paid = FAILED_RUNGS[mode]
    messages = [{"role": "user", "content": f"a paid rung that fails: {mode}"}]
    await fault(spend.fleet.backup, mode, count=1, **({"after": 0} if mode == "malformed" else {}))
    try:
        reply = await clients.chat(OPENAI, "paid_first", messages, stream=False, max_tokens=8)
        assert_well_formed(reply)
        ev = await call_event(spend.fleet.daemon, messages)
        assert ev["backend"] == PRIMARY and ev["error"] is None
        (failed,) = ev["fallbacks"]
        assert failed["ref"] == BACKUP and failed["outcome"] == "failed" and failed["reason"].startswith(kind)
        use = await spend.usage(name, "usd")
        assert use["reserved"] == 0 and use["over"] == 0
        assert use["committed"] == round(ev["cost_usd"] * 1_000_000) == (await spend.history(name))["usd_micros"]
        # The reply's usage is the call's, both rungs: the free primary answered its 8 tokens.
        assert (reply.prompt_tokens, reply.completion_tokens) == (ev["tokens_in"], ev["tokens_out"])
        booked = use["committed"] // 1000  # tokens booked for the backup, at $0.001 a token
        if not paid:
            assert use["committed"] == 0 and ev["tokens_out"] == 8
        elif mode == "empty":  # what it reported: the prompt it evaluated (as the primary counts it) and 1 token
            assert ev["tokens_out"] == 8 + 1 and ev["tokens_in"] % 2 == 0
            assert booked == ev["tokens_in"] // 2 + 1
        else:  # nothing reported: the prompt's bound (at least a token per byte), nothing delivered
            assert ev["tokens_out"] == 8 and booked >= len(messages[0]["content"])
            assert 0 < ev["tokens_in"] - booked < len(messages[0]["content"])  # the rest: the primary's real count
    finally:
        await clients.chat(OPENAI, "paid_first", [{"role": "user", "content": "the backup is well again"}],
                           stream=False, max_tokens=4)  # its breaker counts consecutive failures


@pytest.mark.parametrize("api", APIS)
async def test_an_agent_that_hangs_up_mid_answer_pays_for_what_it_got_and_the_call_is_recorded(
        spend: Spend, agent_clients: tuple[str, Clients], api: str) -> None:
    """The agent reads the first few chunks of a 1000-token stream and closes the connection: the
    reservation is settled for what was delivered (nothing stays held), and the call still has its
    event, saying the client went away."""
    name, clients = agent_clients
    await spend.limit(name, "tokens", 5000)
    messages = [{"role": "user", "content": f"{LONG} hang up on this, {api}"}]
    path, body = (("/v1/chat/completions", {"model": "strict", "messages": messages, "stream": True})
                  if api == OPENAI else ("/api/chat", {"model": "strict", "messages": messages}))
    async with aiohttp.ClientSession() as http:
        async with http.post(spend.url + path, json=body, headers={"Authorization": f"Bearer {clients.key}"}) as r:
            assert r.status == 200
            chunks = 0
            async for _ in r.content:
                chunks += 1
                if chunks == 5:
                    break
            r.connection.transport.abort()  # type: ignore[union-attr]  # a hang-up, not a polite end of body

    event = await call_event(spend.fleet.daemon, messages)
    assert event["error"] == "the client went away before the answer ended" and event["stream"] is True
    assert event["backend"] is None and event["decisions"][0]["effect"] == "allow"
    assert 0 < event["tokens_out"] < DEFAULT_MAX  # what was delivered before the hang-up, not the whole answer
    use = await spend.usage(name, "tokens")
    assert use["reserved"] == 0  # the reservation did not stay held until its TTL
    assert use["committed"] == event["tokens_in"] + event["tokens_out"]


@pytest.mark.parametrize("api", APIS)
async def test_a_hang_up_while_the_backend_is_between_tokens_ends_the_call_at_once(
        spend: Spend, agent_clients: tuple[str, Clients], api: str) -> None:
    """The backend makes a token every 0.4 s (256 of them would take 100 s, past the 20 s total
    timeout): the agent takes the first chunk and hangs up. The call ends then, not at a later
    token or the timeout: the backend sees its request cancelled, the reservation is settled for
    what went out, and the event says the client went away."""
    name, clients = agent_clients
    await spend.limit(name, "tokens", 5000)
    before = (await standin(spend.fleet.primary, "state"))["cancelled"]
    messages = [{"role": "user", "content": f"{LONG} hang up between tokens, {api}"}]
    path, body = (("/v1/chat/completions", {"model": "strict", "messages": messages, "stream": True})
                  if api == OPENAI else ("/api/chat", {"model": "strict", "messages": messages}))
    await standin(spend.fleet.primary, "config", {"token_delay": 0.4})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(spend.url + path, json=body, headers={"Authorization": f"Bearer {clients.key}"}) as r:
                assert r.status == 200
                first = await r.content.readline()
                assert first.strip()
                r.connection.transport.abort()  # type: ignore[union-attr]
        event = await call_event(spend.fleet.daemon, messages, timeout=3.0)
        assert event["error"] == "the client went away before the answer ended" and event["stream"] is True
        assert event["latency_ms"] < 3000
        assert await wait_for(lambda: _cancelled_since(spend, before), 3.0, "the backend's generation to stop")
        use = await spend.usage(name, "tokens")
        assert use["reserved"] == 0
        assert use["committed"] == event["tokens_in"] + event["tokens_out"]
    finally:
        await standin(spend.fleet.primary, "config", {"token_delay": TOKEN_DELAY})


async def how_it_ends(reader: asyncio.StreamReader) -> str:
    """Read a connection to its end: "eof" (closed in order) or "reset"."""
    try:
        while await reader.read(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


async def ask_and_never_read(spend: Spend, clients: Clients, api: str,
                             messages: list[dict[str, Any]]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streamed call for 400,000 tokens on a raw connection whose answer is never read."""
    if api == OPENAI:
        path = "/v1/chat/completions"
        doc: dict[str, Any] = {"model": "strict", "messages": messages, "stream": True, "max_tokens": 400_000}
    else:
        path = "/api/chat"
        doc = {"model": "strict", "messages": messages, "options": {"num_predict": 400_000}}
    body = json.dumps(doc).encode()
    host, port = spend.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window, full at once
    sock.connect((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {clients.key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("api", APIS)
async def test_an_agent_that_stops_reading_then_hangs_up_is_settled_before_its_event(
        spend: Spend, agent_clients: tuple[str, Clients], api: str) -> None:
    """The agent asks for a very long answer at full speed and reads none of it, so Charter's writes
    back up and it waits inside send() when the agent hangs up. The call still ends as any hang-up
    does: what went out is settled before the event is written, and the two agree on the tokens."""
    name, clients = agent_clients
    await spend.limit(name, "tokens", 10_000_000)
    messages = [{"role": "user", "content": f"[[tokens=400000]] stop reading, {api}"}]
    await standin(spend.fleet.primary, "config", {"token_delay": 0})
    try:
        _, writer = await ask_and_never_read(spend, clients, api, messages)
        await asyncio.sleep(2.0)  # megabytes of answer, none read: every buffer on the way is full
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a hang-up with the answer's bytes unread
        event = await call_event(spend.fleet.daemon, messages, timeout=5.0)
        assert event["error"] == "the client went away before the answer ended" and event["stream"] is True
        assert event["tokens_out"] > 0  # settled before the event was written
        use = await spend.usage(name, "tokens")
        assert use["reserved"] == 0
        assert use["committed"] == event["tokens_in"] + event["tokens_out"]
    finally:
        await standin(spend.fleet.primary, "config", {"token_delay": TOKEN_DELAY})


@pytest.mark.parametrize("api", APIS)
async def test_an_agent_that_stops_reading_and_stays_connected_is_let_go_after_client_stall(
        spend: Spend, agent_clients: tuple[str, Clients], api: str) -> None:
    """The agent asks for a very long answer and never reads it, but keeps its connection open.
    After `client_stall` with a chunk untaken, the call ends as a hang-up would: the backend's
    generation is stopped (on Ollama, its slot freed for the others), what went out is settled,
    and the event says why. Without it the call would hold the backend until the total timeout."""
    name, clients = agent_clients
    await spend.limit(name, "tokens", 10_000_000)
    before = (await standin(spend.fleet.primary, "state"))["cancelled"]
    messages = [{"role": "user", "content": f"[[tokens=400000]] read nothing, stay, {api}"}]
    await standin(spend.fleet.primary, "config", {"token_delay": 0})  # every buffer on the way fills at once
    writer = None
    try:
        started = time.monotonic()
        reader, writer = await ask_and_never_read(spend, clients, api, messages)
        event = await call_event(spend.fleet.daemon, messages, timeout=CLIENT_STALL + 10)
        assert event["error"] == f"the client stopped reading the answer for {CLIENT_STALL:g}s"
        assert event["stream"] is True and event["tokens_out"] > 0
        # Let go before the total timeout. How long the stall began after the call did depends on how
        # fast megabytes of answer fill every buffer on the way: ~1 s here, 9 s on a busy CI host.
        assert CLIENT_STALL <= time.monotonic() - started < TOTAL
        assert await wait_for(lambda: _cancelled_since(spend, before), 3.0, "the backend's generation to stop")
        use = await spend.usage(name, "tokens")
        assert use["reserved"] == 0
        assert use["committed"] == event["tokens_in"] + event["tokens_out"]
        # The connection was reset, its unsent bytes dropped: not closed gracefully, which would
        # have kept them for this reader, and ended in a clean EOF once it read them all.
        assert await asyncio.wait_for(how_it_ends(reader), 10) == "reset"
    finally:
        if writer is not None:
            writer.transport.abort()
        await standin(spend.fleet.primary, "config", {"token_delay": TOKEN_DELAY})


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("api", APIS)
async def test_an_agent_that_hangs_up_before_the_answer_begins_ends_the_call_and_pays_for_its_prompt(
        spend: Spend, agent_clients: tuple[str, Clients], api: str, stream: bool) -> None:
    """The backend is still reading the prompt (a second a token) when the agent hangs up. The call
    ends then: the backend sees its request cancelled, and the chain is not walked on, onto the
    paid backup, for nobody. Nothing of the answer went out, but the prompt did, and a paid API
    bills a prompt it has read: the call is booked at its prompt's bound, and nothing stays held."""
    name, clients = agent_clients
    await spend.limit(name, "tokens", 5000)
    before = (await standin(spend.fleet.primary, "state"))["cancelled"]
    messages = [{"role": "user", "content": f"{LONG} hang up before the answer, {api} {stream}"}]
    path, doc = (("/v1/chat/completions", {"model": "strict", "messages": messages, "stream": stream})
                 if api == OPENAI else ("/api/chat", {"model": "strict", "messages": messages, "stream": stream}))
    body = json.dumps(doc).encode()
    host, port = spend.url.removeprefix("http://").split(":")
    await standin(spend.fleet.primary, "config", {"prompt_delay": 1.0})  # seconds for each prompt token
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {clients.key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await asyncio.sleep(0.5)  # inside the primary's first-token timeout (1.5 s)
        writer.transport.abort()
        event = await call_event(spend.fleet.daemon, messages, timeout=5.0)
        assert event["error"] == "the client went away before the answer ended" and event["stream"] is stream
        assert event["latency_ms"] < 1400  # at the hang-up, not at the first-token timeout
        assert [d["ref"] for d in event["decisions"]] == ["primary/llama3.2:3b"]  # the backup was never asked
        assert await wait_for(lambda: _cancelled_since(spend, before), 3.0, "the backend's request to end")
        assert event["tokens_in"] > 0 and event["tokens_out"] == 0
        use = await spend.usage(name, "tokens")
        assert use["reserved"] == 0
        assert use["committed"] == event["tokens_in"]
    finally:
        await standin(spend.fleet.primary, "config", {"prompt_delay": 0.00002})


async def _cancelled_since(spend: Spend, before: int) -> bool | None:
    return (await standin(spend.fleet.primary, "state"))["cancelled"] > before or None

"""The two APIs as their official clients see them: listings, show, version, ps, embeddings, generate,
errors in each API's own shape, bearer keys (missing, wrong, revoked, rotated) and policy on calls.

One fleet for the module, with periodic probes off so a fault set for one request is met by it.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from charter import __version__
from charter.models.standin import spawn_standin
from tests.conftest import start_daemon
from tests.gateway.conftest import Fleet, gateway_home
from tests.gateway.support import (
    APIS,
    BACKUP,
    OLLAMA,
    OPENAI,
    PRIMARY,
    TOKEN_DELAY,
    Clients,
    assert_well_formed,
    call_event,
    direct_chat,
    enroll_key,
    fault,
    finish,
    heal,
    model_events,
    space_tokens,
    standin,
    start,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NAMES = {"default", "strict", "solo", PRIMARY, BACKUP}


@dataclass
class Api:
    fleet: Fleet
    key: str  # alpha, a worker
    observer: str  # owl, an observer (max tier T0)

    @property
    def url(self) -> str:
        return self.fleet.daemon.url


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    fleet = start(tmp_path_factory.mktemp("api") / "home", probe="1h", cooldown="0.2s")
    try:
        yield Api(fleet, enroll_key(fleet.daemon, "alpha"), enroll_key(fleet.daemon, "owl", "observer"))
    finally:
        finish(fleet)


@pytest.fixture
async def clients(api: Api) -> AsyncIterator[Clients]:
    c = Clients(api.url, api.key)
    yield c
    await c.close()


async def direct_embed(url: str, model: str, inputs: list[str]) -> list[list[float]]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as h:
        r = await h.post(url + "/api/embed", json={"model": model, "input": inputs})
    r.raise_for_status()
    return r.json()["embeddings"]


def same_vectors(got: list[list[float]], expected: list[list[float]]) -> bool:
    return [len(v) for v in got] == [len(v) for v in expected] and all(
        abs(a - b) < 1e-7 for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True))


async def embed_events(api: Api) -> list[dict[str, Any]]:
    return [e["payload"] for e in await model_events(api.fleet.daemon)
            if e["subject"] == "charter.models.calls" and e["payload"].get("kind") == "embed"]


# ---------------------------------------------------------------------------------------------
# listings and metadata


async def test_openai_models_lists_aliases_and_backend_models(clients: Clients) -> None:
    models = [m async for m in clients.openai.models.list()]
    assert {m.id for m in models} == NAMES  # "degraded" is a rung, not a model
    assert all(m.object == "model" and m.owned_by == "charter" for m in models)


async def test_ollama_tags(clients: Clients) -> None:
    listed = await clients.ollama.list()
    assert {m.model for m in listed.models} == NAMES
    by_name = {m.model: m for m in listed.models}
    assert by_name["default"].details.family == "alias"
    assert by_name[PRIMARY].details.family == "primary"
    assert all(m.digest and len(m.digest) == 64 for m in listed.models)


async def test_ollama_show_gives_the_chain(clients: Clients) -> None:
    shown = await clients.ollama.show("default")
    assert shown.modelinfo == {"charter.chain": [PRIMARY, BACKUP, "degraded"]}
    assert shown.details.family == "alias"
    assert (await clients.ollama.show(PRIMARY)).modelinfo == {"charter.chain": [PRIMARY]}
    with pytest.raises(ollama.ResponseError) as missing:
        await clients.ollama.show("no-such-model")
    assert missing.value.status_code == 404 and "not found" in missing.value.error


async def test_ollama_version(api: Api) -> None:
    async with httpx.AsyncClient(trust_env=False) as h:
        r = await h.get(api.url + "/api/version")  # Ollama clients probe it without credentials
    assert r.status_code == 200 and r.json() == {"version": f"0.12.6-charter.{__version__}"}


async def test_ollama_ps_shows_what_the_backends_have_loaded(clients: Clients) -> None:
    await clients.chat(OLLAMA, PRIMARY, [{"role": "user", "content": "load it"}], stream=False)
    loaded = await clients.ollama.ps()
    names = {m.model for m in loaded.models}
    assert PRIMARY in names and names <= {PRIMARY, BACKUP}


# ---------------------------------------------------------------------------------------------
# embeddings


async def test_embeddings_through_both_apis(api: Api, clients: Clients) -> None:
    inputs = ["a river runs", "stone and water"]
    expected = await direct_embed(api.fleet.primary.url, "llama3.2:3b", inputs)

    o = await clients.openai.embeddings.create(model="default", input=inputs)
    assert [d.index for d in o.data] == [0, 1]
    assert same_vectors([d.embedding for d in o.data], expected)
    assert o.usage.prompt_tokens > 0 and o.model == "default"

    e = await clients.ollama.embed(model="default", input=inputs)
    assert same_vectors([list(v) for v in e.embeddings], expected)
    assert e.prompt_eval_count and e.prompt_eval_count > 0

    legacy = await clients.ollama.embeddings(model="default", prompt=inputs[0])
    assert same_vectors([list(legacy.embedding)], expected[:1])

    events = (await embed_events(api))[-3:]
    assert [(ev["api"], ev["backend"]) for ev in events] == [(OPENAI, PRIMARY), (OLLAMA, PRIMARY), (OLLAMA, PRIMARY)]


@pytest.mark.parametrize(("mode", "reason"), [("http500", "runner_error: HTTP 500"),
                                             ("malformed", "malformed: the embeddings answer is not a JSON object")])
@pytest.mark.parametrize("which", APIS)
async def test_embeddings_fail_over(api: Api, clients: Clients, which: str, mode: str, reason: str) -> None:
    """The primary refuses (HTTP 500) or answers HTTP 200 with garbage: either way the backup's
    vectors come back, and the event says why the primary was passed over."""
    await heal(api.fleet, clients)
    expected = await direct_embed(api.fleet.backup.url, "qwen2.5:0.5b", ["fail over"])
    await fault(api.fleet.primary, mode, 1)
    if which == OPENAI:
        got = [(await clients.openai.embeddings.create(model="default", input="fail over")).data[0].embedding]
    else:
        got = [list(v) for v in (await clients.ollama.embed(model="default", input="fail over")).embeddings]
    assert same_vectors(got, expected) and len(got[0]) == 896  # the backup's vector (llama's are 3072 wide)
    ev = (await embed_events(api))[-1]
    assert ev["api"] == which and ev["backend"] == BACKUP
    assert ev["attempts"][0]["ref"] == PRIMARY and ev["attempts"][0]["outcome"] == "failed"
    assert ev["attempts"][0]["reason"].startswith(reason)


# ---------------------------------------------------------------------------------------------
# /api/generate


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_generate(api: Api, clients: Clients, stream: bool) -> None:
    prompt, system = f"generate {stream}: the meadow", "answer plainly"
    expected = await direct_chat(api.fleet.primary, "llama3.2:3b",
                                 [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    if stream:
        parts = [p async for p in await clients.ollama.generate(model="default", prompt=prompt, system=system,
                                                                stream=True)]
        assert all(not p.done for p in parts[:-1]) and parts[-1].done is True
        text, last = "".join(p.response for p in parts), parts[-1]
    else:
        last = await clients.ollama.generate(model="default", prompt=prompt, system=system, stream=False)
        text = last.response
    assert text == expected
    assert last.done_reason == "stop" and last.eval_count and last.prompt_eval_count
    ev = await call_event(api.fleet.daemon, [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    assert ev["api"] == OLLAMA and ev["backend"] == PRIMARY and ev["stream"] is stream


# ---------------------------------------------------------------------------------------------
# errors in each API's shape


async def test_unknown_model_is_404_in_each_shape(clients: Clients) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        await clients.openai.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found" and "'gpt-nope' not found" in nf.value.body["message"]  # type: ignore[index]
    assert "default" in nf.value.body["message"]  # type: ignore[index]  # it names what is known
    with pytest.raises(openai.NotFoundError):
        await clients.openai.embeddings.create(model="gpt-nope", input="x")
    with pytest.raises(ollama.ResponseError) as chat:
        await clients.ollama.chat(model="nope:1b", messages=[{"role": "user", "content": "x"}])
    assert chat.value.status_code == 404 and "not found" in chat.value.error
    with pytest.raises(ollama.ResponseError) as gen:
        await clients.ollama.generate(model="nope:1b", prompt="x", stream=False)
    assert gen.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as emb:
        await clients.ollama.embed(model="nope:1b", input="x")
    assert emb.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as unknown_backend:  # backend/model with an unknown backend
        await clients.ollama.chat(model="elsewhere/llama3.2:3b", messages=[{"role": "user", "content": "x"}])
    assert unknown_backend.value.status_code == 404


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
                                              ("GET", "/v1/models"), ("POST", "/api/chat"), ("POST", "/api/generate"),
                                              ("POST", "/api/embed"), ("GET", "/api/tags"), ("GET", "/api/ps"),
                                              ("POST", "/api/show")])
@pytest.mark.parametrize("auth", [None, "Bearer ck_not-a-real-key", "Basic dXNlcjpwYXNz"])
async def test_missing_or_invalid_key_is_401(api: Api, method: str, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}], "prompt": "x", "input": "x"}
    async with httpx.AsyncClient(trust_env=False, timeout=10) as h:
        r = await h.request(method, api.url + path, json=body if method == "POST" else None, headers=headers)
    assert r.status_code == 401, r.text
    doc = r.json()
    if path.startswith("/v1/"):
        assert set(doc["error"]) >= {"message", "type", "param", "code"}
        assert doc["error"]["type"] == "authentication_error" and doc["error"]["code"] == "unauthorized"
    else:
        assert set(doc) == {"error"} and isinstance(doc["error"], str)


async def test_wrong_key_with_the_official_clients(api: Api) -> None:
    wrong = Clients(api.url, "ck_wrong")
    try:
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat(OPENAI, "default", [{"role": "user", "content": "x"}], stream=False)
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat(OPENAI, "default", [{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(ollama.ResponseError) as e:
            await wrong.chat(OLLAMA, "default", [{"role": "user", "content": "x"}], stream=True)
        assert e.value.status_code == 401 and "unknown or replaced API key" in e.value.error
    finally:
        await wrong.close()


async def test_revoked_agent_is_refused_at_once(api: Api) -> None:
    key = enroll_key(api.fleet.daemon, "doomed")
    doomed = Clients(api.url, key)
    try:
        assert_well_formed(await doomed.chat(OPENAI, "default", [{"role": "user", "content": "hi"}], stream=False))
        await api.fleet.daemon.admin("POST", "/v1/admin/agents/doomed/revoke", json={"reason": "test"})
        with pytest.raises(openai.PermissionDeniedError) as denied:  # the very next call, no cache to expire
            await doomed.chat(OPENAI, "default", [{"role": "user", "content": "hi again"}], stream=True)
        assert denied.value.code == "revoked" and "revoked" in denied.value.body["message"]  # type: ignore[index]
        with pytest.raises(ollama.ResponseError) as e:
            await doomed.chat(OLLAMA, "default", [{"role": "user", "content": "hi again"}], stream=False)
        assert e.value.status_code == 403 and "revoked" in e.value.error
        with pytest.raises(openai.PermissionDeniedError):
            await doomed.openai.models.list()
    finally:
        await doomed.close()


async def test_api_key_rotation_invalidates_the_old_key(api: Api) -> None:
    agent = await api.fleet.daemon.enroll("rotor", "worker")
    old = Clients(api.url, agent.api_key or "")
    try:
        assert_well_formed(await old.chat(OLLAMA, "default", [{"role": "user", "content": "before"}], stream=False))
        new_key = await agent.rotate_api_key()  # POST /v1/agent/api-key, signed with the agent's key
        assert new_key != old.key
        with pytest.raises(openai.AuthenticationError):
            await old.chat(OPENAI, "default", [{"role": "user", "content": "old key"}], stream=False)
        with pytest.raises(ollama.ResponseError) as e:
            await old.chat(OLLAMA, "default", [{"role": "user", "content": "old key"}], stream=False)
        assert e.value.status_code == 401
        new = Clients(api.url, new_key)
        try:
            for which in APIS:
                assert_well_formed(await new.chat(which, "default", [{"role": "user", "content": "new"}], stream=True))
        finally:
            await new.close()
    finally:
        await old.close()
        await agent.close()


# ---------------------------------------------------------------------------------------------
# policy on calls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("alias", ["default", "strict", PRIMARY])
async def test_observer_is_refused_local_models(api: Api, clients: Clients, alias: str, stream: bool) -> None:
    """Local models are T1 in the default policy; an observer may act up to T0. The degraded rung is
    governed too (the policy names `provider == "degraded"`), so a chain ending in it is refused as well."""
    messages = [{"role": "user", "content": f"observer asks {alias} {stream}"}]
    # a worker asks the same first, so a cached answer exists for the degraded rung to offer
    assert_well_formed(await clients.chat(OPENAI, alias, messages, stream=False))
    owl = Clients(api.url, api.observer)
    try:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await owl.chat(OPENAI, alias, messages, stream=stream)
        body: dict[str, Any] = denied.value.body  # type: ignore[assignment]
        assert body["code"] == "policy_denied" and body["type"] == "permission_error"
        assert body["message"].startswith("policy allows none of this alias's models for this agent")
        refused = [r["ref"] for r in body["charter"]["refusals"]]
        assert refused == {"default": [PRIMARY, BACKUP, "degraded"], "strict": [PRIMARY, BACKUP],
                           PRIMARY: [PRIMARY]}[alias]
        assert all(r["policy"]["tier"] == "T1" for r in body["charter"]["refusals"])
        with pytest.raises(ollama.ResponseError) as e:
            await owl.chat(OLLAMA, alias, messages, stream=stream)
        assert e.value.status_code == 403 and re.search(r"may act up to T0", e.value.error)
    finally:
        await owl.close()
    ev = await call_event(api.fleet.daemon, messages)  # the refusal is recorded too
    assert ev["name"] == "owl" and ev["backend"] is None and ev["error"]
    assert all(f["outcome"] == "skipped" and f["reason"].startswith("policy: ") for f in ev["fallbacks"])


FREE_ROLE = """
[roles.unmetered]
description = "A worker with no budget: its model calls reserve nothing."
publish = ["agents.{name}.>"]
subscribe = ["agents.{name}.>"]
read = []
policy = "default"
max_tier = "T2"
"""


async def test_the_answer_is_not_held_back_by_its_call_event(tmp_path: Path) -> None:
    """Another process holds charter.db's write lock: an agent with no budget (nothing to reserve)
    still gets its answer at once, since the call event is written after it is sent; once the lock
    is released (within SQLite's busy timeout) the event is written, not lost."""
    primary = spawn_standin(models=["llama3.2:3b"], control_port=True, token_delay=0.001)
    backup = spawn_standin(models=["qwen2.5:0.5b"], control_port=True, token_delay=0.001)
    home = gateway_home(tmp_path / "home", primary.port, backup.port, probe="1h")
    home.config_path.write_text(home.config_path.read_text() + FREE_ROLE)
    fleet = Fleet(home, start_daemon(home), primary, backup)
    clients = Clients(fleet.daemon.url, enroll_key(fleet.daemon, "locked-out", "unmetered"), timeout=5.0)
    blocker = sqlite3.connect(home.db_path, isolation_level=None)
    messages = [{"role": "user", "content": "answer me while the log is locked"}]
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert_well_formed(await clients.chat(OPENAI, "default", messages, stream=False))
        await asyncio.sleep(1.0)  # the daemon is now waiting for the lock to write the event
        blocker.execute("ROLLBACK")
        event = await call_event(fleet.daemon, messages, timeout=10.0)
        assert event["error"] is None and event["name"] == "locked-out"
        assert "could not be written" not in home.log_file.read_text(errors="replace")
    finally:
        blocker.close()
        await clients.close()
        finish(fleet)


@pytest.mark.parametrize("api_name", APIS)
async def test_a_token_is_passed_on_as_soon_as_it_arrives(api: Api, api_name: str) -> None:
    """Text that arrives together goes out as one chunk, but nothing is held back for company: with
    the backend's tokens 250 ms apart, every token reaches the client in its own chunk, each about
    250 ms after the one before. (250, not less: a busy CI host can stall a process for a tenth of
    a second, and two tokens queued meanwhile rightly leave together.)"""
    import time

    import aiohttp

    gap = 0.25
    await space_tokens(api.fleet.primary, gap)
    messages = [{"role": "user", "content": f"one at a time, {api_name} [[tokens=6]]"}]
    path, body = (("/v1/chat/completions", {"model": PRIMARY, "messages": messages, "stream": True})
                  if api_name == OPENAI else ("/api/chat", {"model": PRIMARY, "messages": messages}))
    arrivals: list[float] = []
    try:
        async with aiohttp.ClientSession() as http, http.post(
                api.url + path, json=body, headers={"Authorization": f"Bearer {api.key}"}) as r:
            assert r.status == 200
            async for raw in r.content:
                line = raw.strip()
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    arrivals.append(time.monotonic())
                elif line.startswith(b"{") and b'"done":false' in line:
                    arrivals.append(time.monotonic())
    finally:
        await space_tokens(api.fleet.primary, TOKEN_DELAY)
    assert len(arrivals) == 6, f"{len(arrivals)} chunks with text for 6 spaced tokens"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(gap * 0.5 < g < gap * 3 for g in gaps), gaps


async def test_a_finished_answer_gives_its_connection_back(api: Api, clients: Clients) -> None:
    """One agent's calls one after another reuse one connection to the backend. An answer is over
    at its last event, but the end of the HTTP body can come a moment later: a connection given
    back before it is closed by the pool, and every call would pay for a new one."""
    await standin(api.fleet.primary, "reset", {})
    for i in range(12):
        name, stream = APIS[i % 2], i % 4 >= 2
        assert_well_formed(await clients.chat(name, PRIMARY, [{"role": "user", "content": f"reuse {i}"}],
                                              stream=stream))
    state = await standin(api.fleet.primary, "state")
    assert state["requests"].get("/v1/chat/completions", 0) + state["requests"].get("/api/chat", 0) == 12
    assert state["connections_seen"] <= 2, state

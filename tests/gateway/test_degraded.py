"""Every model down: an honest degraded answer (a well-formed 200), or for an alias without the
degraded rung a well-formed 503 in the API's own shape; a prompt answered before gets its cached answer.

One fleet for the module: while both stand-ins are healthy it answers one prompt (which the gateway
caches), then both are killed with SIGKILL and stay dead for the rest of the module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import ollama
import openai
import pytest

from tests.gateway.conftest import Fleet
from tests.gateway.support import (
    APIS,
    BACKUP,
    OPENAI,
    PRIMARY,
    Clients,
    assert_well_formed,
    call_event,
    enroll_key,
    finish,
    run_sync,
    start,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VARIANTS = [(api, stream) for api in APIS for stream in (False, True)]
IDS = [f"{api}-{'stream' if stream else 'whole'}" for api, stream in VARIANTS]
ASKED_BEFORE = [{"role": "user", "content": "what did the harbor master say?"}]


@dataclass
class Down:
    fleet: Fleet
    key: str
    cached: str  # the answer to ASKED_BEFORE while everything was up


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Down]:
    fleet = start(tmp_path_factory.mktemp("degraded") / "home")
    try:
        key = enroll_key(fleet.daemon, "alpha")

        async def answer_while_up() -> str:
            clients = Clients(fleet.daemon.url, key)
            try:
                reply = await clients.chat(OPENAI, "default", ASKED_BEFORE, stream=False)
                assert reply.charter and reply.charter["backend"] == PRIMARY
                return reply.text
            finally:
                await clients.close()

        cached = run_sync(answer_while_up)
        fleet.primary.kill()
        fleet.backup.kill()
        yield Down(fleet, key, cached)
    finally:
        finish(fleet)


@pytest.fixture
async def clients(down: Down) -> AsyncIterator[Clients]:
    c = Clients(down.fleet.daemon.url, down.key)
    yield c
    await c.close()


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
async def test_degraded_answer_names_what_is_down(down: Down, clients: Clients, api: str, stream: bool) -> None:
    messages = [{"role": "user", "content": f"is anything up? {api} {stream}"}]
    reply = await clients.chat(api, "default", messages, stream=stream)
    assert_well_formed(reply, usage=False)  # 200, text, a proper finish, a usage block
    assert reply.text.startswith("[Charter degraded mode] No model can answer right now. What is down: ")
    assert PRIMARY in reply.text and BACKUP in reply.text
    ev = await call_event(down.fleet.daemon, messages)
    assert ev["error"] is None and ev["degraded"] is True and ev["backend"] == "degraded"
    assert [f["ref"] for f in ev["fallbacks"]] == [PRIMARY, BACKUP]
    if reply.charter is not None:
        assert reply.charter["degraded"] is True and reply.charter["backend"] == "degraded"


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
async def test_cached_answer_is_offered_for_a_prompt_answered_before(down: Down, clients: Clients, api: str,
                                                                     stream: bool) -> None:
    reply = await clients.chat(api, "default", ASKED_BEFORE, stream=stream)
    assert_well_formed(reply, usage=False)
    assert reply.text.startswith("[Charter degraded mode: every model is unavailable (")
    assert f"This is a cached answer from {PRIMARY} to the same prompt.]" in reply.text
    assert reply.text.endswith("\n\n" + down.cached)


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
async def test_alias_without_degraded_gives_503_in_the_api_shape(down: Down, clients: Clients, api: str,
                                                                 stream: bool) -> None:
    messages = [{"role": "user", "content": f"strict {api} {stream}"}]
    if api == OPENAI:
        with pytest.raises(openai.APIStatusError) as caught:
            if stream:
                s = await clients.openai.chat.completions.create(model="strict", messages=messages, stream=True)  # type: ignore[arg-type]
                async for _ in s:
                    pytest.fail("a stream was opened")
            else:
                await clients.openai.chat.completions.create(model="strict", messages=messages)  # type: ignore[arg-type]
        e = caught.value
        assert e.status_code == 503 and e.code == "all_backends_failed" and e.type == "api_error"
        assert isinstance(e.body, dict) and set(e.body) >= {"message", "type", "param", "code"}
        assert [a["ref"] for a in e.body["charter"]["attempts"]] == [PRIMARY, BACKUP]
        message = e.body["message"]
    else:
        with pytest.raises(ollama.ResponseError) as failed:
            if stream:
                async for _ in await clients.ollama.chat(model="strict", messages=messages, stream=True):
                    pytest.fail("a stream was opened")
            else:
                await clients.ollama.chat(model="strict", messages=messages, stream=False)
        assert failed.value.status_code == 503
        message = failed.value.error
    assert message.startswith("every backend failed: ") and PRIMARY in message and BACKUP in message
    ev = await call_event(down.fleet.daemon, messages)
    assert ev["backend"] is None and ev["error"] and ev["api"] == api


async def test_embeddings_when_everything_is_down(down: Down, clients: Clients) -> None:
    """No degraded rung for vectors: a 503 in each API's shape."""
    with pytest.raises(openai.APIStatusError) as caught:
        await clients.openai.embeddings.create(model="default", input="anything")
    assert caught.value.status_code == 503 and caught.value.code == "all_backends_failed"
    with pytest.raises(ollama.ResponseError) as failed:
        await clients.ollama.embed(model="default", input="anything")
    assert failed.value.status_code == 503 and failed.value.error.startswith("every backend failed")

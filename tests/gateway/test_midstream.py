"""Mid-stream failures: continued on the backup with the partial answer as context, or a proper error.

Two fleets: one with `midstream = "continue"` (the default), one with `midstream = "error"`. The
stand-ins are deterministic, so what a continued answer must be is known exactly: the primary's
first tokens (what it sent before failing), then what the backup answers when the partial answer
is given to it as the assistant's turn. A failure before any token went out fails over unseen in
either mode. Periodic probes are off so a fault set for one request is met by that request.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import ollama
import openai
import pytest

from charter.models.standin import split_tokens
from tests.gateway.conftest import Fleet
from tests.gateway.support import (
    APIS,
    BACKUP,
    OPENAI,
    PRIMARY,
    Clients,
    assert_well_formed,
    call_event,
    direct_chat,
    enroll_key,
    fault,
    finish,
    heal,
    raw_ollama,
    space_tokens,
    start,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VARIANTS = [(api, stream) for api in APIS for stream in (False, True)]
IDS = [f"{api}-{'stream' if stream else 'whole'}" for api, stream in VARIANTS]
# the mid-stream faults, and how many tokens each lets out first (the stand-in's defaults)
AFTER = {"error_midstream": 3, "disconnect_midstream": 3, "malformed": 1}
REASON = {"error_midstream": r"^midstream_error: .*unexpected EOF", "disconnect_midstream": r"^disconnected: ",
          "malformed": r"^malformed: "}


def _fleet(tmp_path_factory: pytest.TempPathFactory, midstream: str) -> Iterator[tuple[Fleet, str]]:
    fleet = start(tmp_path_factory.mktemp(midstream) / "home", midstream=midstream, probe="1h", cooldown="0.2s")
    try:
        yield fleet, enroll_key(fleet.daemon, "alpha")
    finally:
        finish(fleet)


@pytest.fixture(scope="module")
def continuing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, str]]:
    yield from _fleet(tmp_path_factory, "continue")


@pytest.fixture(scope="module")
def erroring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, str]]:
    yield from _fleet(tmp_path_factory, "error")


@pytest.fixture
async def cont(continuing: tuple[Fleet, str]) -> AsyncIterator[tuple[Fleet, Clients]]:
    fleet, key = continuing
    clients = Clients(fleet.daemon.url, key)
    await heal(fleet, clients)
    yield fleet, clients
    await clients.close()


@pytest.fixture
async def err(erroring: tuple[Fleet, str]) -> AsyncIterator[tuple[Fleet, Clients]]:
    fleet, key = erroring
    clients = Clients(fleet.daemon.url, key)
    await heal(fleet, clients)
    yield fleet, clients
    await clients.close()


async def expected_continuation(fleet: Fleet, messages: list[dict[str, Any]], after: int) -> tuple[str, str]:
    """(partial, continuation): the primary's first `after` tokens, and the backup's answer to them."""
    return (await continuations(fleet, messages, after, after))[0]


async def continuations(fleet: Fleet, messages: list[dict[str, Any]], low: int, high: int) -> list[tuple[str, str]]:
    """For k in low..high: the primary's first k tokens, and what the backup answers given them as context."""
    whole = await direct_chat(fleet.primary, "llama3.2:3b", messages)
    tokens = split_tokens(whole)
    assert len(tokens) > high
    out = []
    for k in range(low, high + 1):
        partial = "".join(tokens[:k])
        rest = await direct_chat(fleet.backup, "qwen2.5:0.5b", [*messages, {"role": "assistant", "content": partial}])
        out.append((partial, rest))
    return out


async def arm(fleet: Fleet, what: str, count: int = 1, **params: Any) -> None:
    """Put a mid-stream fault on the primary for its next `count` requests."""
    if what == "disconnect_midstream":
        await space_tokens(fleet.primary)  # some tokens surely get out before the abort (see support.SPACED)
    await fault(fleet.primary, what, count, **params)


# ---------------------------------------------------------------------------------------------
# midstream = "continue"


@pytest.mark.parametrize("mode", ["openai", "ollama", "ollama-wire"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("what", ["error_midstream", "disconnect_midstream"])
async def test_continues_on_the_backup_with_the_partial_answer(cont: tuple[Fleet, Clients], what: str, stream: bool,
                                                              mode: str) -> None:
    fleet, clients = cont
    messages = [{"role": "user", "content": f"continue {what} {mode} {stream}: tell me about harbors [[tokens=12]]"}]
    # error_midstream sends exactly its 3 tokens; an aborted connection may lose the last ones
    low = 1 if what == "disconnect_midstream" else AFTER[what]
    candidates = await continuations(fleet, messages, low, AFTER[what])
    await arm(fleet, what)

    if mode == "ollama-wire":  # the `ollama` client drops fields it does not know: read the wire itself
        lines = await raw_ollama(fleet.daemon.url, clients.key, "/api/chat",
                                 {"model": "default", "messages": messages, "stream": stream})
        assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"] is True
        text = "".join(line["message"]["content"] for line in lines)
        meta = lines[-1]["charter"]
        assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] > 0
    else:
        reply = await clients.chat(mode, "default", messages, stream=stream)
        assert_well_formed(reply)
        text, meta = reply.text, reply.charter
    # the primary's words as they went out, then the backup's answer given them as context
    assert text in [partial + rest for partial, rest in candidates], text
    if meta is not None:
        assert meta["continued_after"] == [PRIMARY]
        assert meta["backend"] == BACKUP
        assert meta["fallbacks"][0]["ref"] == PRIMARY
    ev = await call_event(fleet.daemon, messages)
    assert ev["error"] is None and ev["backend"] == BACKUP and ev["continued_after"] == [PRIMARY]
    assert re.search(REASON[what], ev["fallbacks"][0]["reason"])


async def test_when_every_backend_fails_midstream_the_client_gets_an_error(cont: tuple[Fleet, Clients]) -> None:
    """`continue` with nothing left to continue on (alias `strict`, both fail): an error, not a cut-off answer."""
    fleet, clients = cont
    await fault(fleet.primary, "error_midstream", 1)
    await fault(fleet.backup, "error_midstream", 1)
    got = ""
    with pytest.raises(openai.APIError) as caught:
        stream = await clients.openai.chat.completions.create(
            model="strict", messages=[{"role": "user", "content": "both break"}], stream=True)
        async for chunk in stream:
            assert chunk.choices[0].finish_reason is None
            got += chunk.choices[0].delta.content or ""
    assert got  # tokens had gone out
    assert caught.value.code == "midstream_failure"
    assert "broke off" in caught.value.message


async def test_continuing_into_degraded_says_so(cont: tuple[Fleet, Clients]) -> None:
    """Alias `solo` (primary, degraded): the partial answer is kept and the degraded note follows it."""
    fleet, clients = cont
    messages = [{"role": "user", "content": "solo continue [[tokens=12]]"}]
    partial, _ = await expected_continuation(fleet, messages, 3)
    await fault(fleet.primary, "error_midstream", 1)
    reply = await clients.chat(OPENAI, "solo", messages, stream=True)
    assert reply.finish == "stop"
    assert reply.text.startswith(partial + "\n\n[Charter degraded mode]")
    assert reply.charter and reply.charter["degraded"] is True and reply.charter["continued_after"] == [PRIMARY]


# ---------------------------------------------------------------------------------------------
# midstream = "error"


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("what", list(AFTER))
async def test_error_mode_ends_with_an_error_in_the_api_shape(err: tuple[Fleet, Clients], what: str, api: str,
                                                              stream: bool) -> None:
    fleet, clients = err
    messages = [{"role": "user", "content": f"error mode {what} {api} {stream} [[tokens=12]]"}]
    partial, _ = await expected_continuation(fleet, messages, AFTER[what])
    await arm(fleet, what)
    got = ""

    def went_out(got: str) -> bool:  # what went out before the failure, and nothing else
        return got == partial or (what == "disconnect_midstream" and bool(got) and partial.startswith(got))

    if api == OPENAI and stream:
        with pytest.raises(openai.APIError) as caught:
            s = await clients.openai.chat.completions.create(model="default", messages=messages, stream=True)  # type: ignore[arg-type]
            async for chunk in s:
                assert chunk.choices and chunk.choices[0].finish_reason is None  # never a proper-looking end
                got += chunk.choices[0].delta.content or ""
        assert not isinstance(caught.value, openai.APIStatusError)  # raised from the stream itself
        assert caught.value.code == "midstream_failure" and "broke off" in caught.value.message
        assert went_out(got), got
    elif api == OPENAI:
        with pytest.raises(openai.APIStatusError) as status:
            await clients.openai.chat.completions.create(model="default", messages=messages)  # type: ignore[arg-type]
        assert status.value.status_code == 502
        assert status.value.code == "midstream_failure" and status.value.type == "api_error"
    elif stream:
        with pytest.raises(ollama.ResponseError) as failed:
            async for part in await clients.ollama.chat(model="default", messages=messages, stream=True):
                assert not part.done
                got += part.message.content or ""
        assert "broke off" in failed.value.error
        assert went_out(got), got
    else:
        with pytest.raises(ollama.ResponseError) as failed:
            await clients.ollama.chat(model="default", messages=messages, stream=False)
        assert failed.value.status_code == 502 and "broke off" in failed.value.error
    ev = await call_event(fleet.daemon, messages)
    assert ev["backend"] is None and ev["error"]
    assert ev["attempts"][0]["ref"] == PRIMARY and ev["attempts"][0]["outcome"] == "failed"
    assert re.search(REASON[what], ev["attempts"][0]["reason"])
    assert BACKUP not in [a["ref"] for a in ev["attempts"]]  # not continued elsewhere


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("what", ["error_midstream", "disconnect_midstream"])
async def test_failure_before_any_token_fails_over_unseen(err: tuple[Fleet, Clients], what: str, api: str,
                                                          stream: bool) -> None:
    """Even with midstream = "error": nothing had gone out, so the backup answers and no error shows."""
    fleet, clients = err
    messages = [{"role": "user", "content": f"before any token {what} {api} {stream}"}]
    # Twice: a request dropped before any answer on a reused keep-alive connection is retried once on
    # a fresh one (a stale socket is not a failure; Go's http.Transport does the same), so a primary
    # that really drops requests must drop the retry too.
    await arm(fleet, what, count=2, after=0)
    try:
        reply = await clients.chat(api, "default", messages, stream=stream)
    finally:
        await fault(fleet.primary, "none")
    assert_well_formed(reply)
    assert reply.text == await direct_chat(fleet.backup, "qwen2.5:0.5b", messages)  # the backup's answer, whole
    ev = await call_event(fleet.daemon, messages)
    assert ev["error"] is None and ev["backend"] == BACKUP and ev["continued_after"] == []
    assert [f["ref"] for f in ev["fallbacks"]] == [PRIMARY]
    reason = {"error_midstream": r"^runner_error: HTTP 500: .*unexpected EOF",
              "disconnect_midstream": r"^disconnected: .*ServerDisconnectedError"}[what]
    assert re.search(reason, ev["fallbacks"][0]["reason"])
    if reply.charter is not None:
        assert reply.charter["fallbacks"] == ev["fallbacks"] and reply.charter["continued_after"] == []


async def test_ollama_wire_error_line(err: tuple[Fleet, Clients]) -> None:
    """On the wire, Ollama's shape: NDJSON parts, then one `{"error": ...}` line, and no done part."""
    fleet, clients = err
    messages = [{"role": "user", "content": "wire error [[tokens=12]]"}]
    await fault(fleet.primary, "error_midstream", 1)
    lines = await raw_ollama(fleet.daemon.url, clients.key, "/api/chat", {"model": "default", "messages": messages})
    assert [set(line) & {"error", "done"} for line in lines[:-1]] == [{"done"}] * (len(lines) - 1)
    assert all(line["done"] is False for line in lines[:-1])
    assert set(lines[-1]) == {"error"} and "broke off" in lines[-1]["error"]

"""The fault matrix: every way the primary Ollama fails, through the real daemon and both official clients.

One fleet serves the whole module: a daemon in front of two stand-in Ollama processes, primary and
backup. Each case puts one fault on the primary (or kills, stops it), asks the `default` alias
through the `openai` or the `ollama` client, streaming or not, and checks that the client got a
well-formed answer (never an error) and that the call event names the primary's failure and why.
Before each case both backends are healed (`support.heal`): the stand-ins reset (the primary
respawned on its port or resumed if need be), circuits closed again by a probe, and one direct call
to each so its count of consecutive failures starts at zero.

Timeouts are short so the matrix stays fast: first token 1s, a cold model (not in /api/ps) 2.5s.
Periodic probes are off (1h) so they never take a fault meant for a case; an open circuit is still
probed as soon as its cooldown (0.2s) ends, which is what closes it between cases.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway.conftest import Fleet
from tests.gateway.support import (
    APIS,
    BACKUP,
    OLLAMA,
    OPENAI,
    PRIMARY,
    Clients,
    assert_well_formed,
    call_event,
    enroll_key,
    fault,
    finish,
    heal,
    model_events,
    respawn,
    space_tokens,
    standin,
    start,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FIRST_TOKEN, COLD_FIRST_TOKEN = "1s", "2.5s"
NOT_ANSWERING = r"^first_token_timeout: no first token within 1s$"


@dataclass(frozen=True)
class Case:
    fault: str
    reason: str | None  # what the primary's failure must say (a regex); None: the primary answers
    continued: bool = False  # tokens went out before the failure: the backup continues the answer
    cold: bool = False  # asks a model the primary has not loaded, through an alias of its own


CASES = [
    Case("exit", r"^(refused|disconnected): "),  # os._exit at the next request
    Case("kill", r"^(refused|disconnected): "),  # SIGKILL of the process
    Case("sigstop", NOT_ANSWERING),  # SIGSTOP: the port accepts, nothing answers
    Case("hang", NOT_ANSWERING),
    Case("refuse", r"^refused: connection refused"),
    Case("http500", r"^runner_error: HTTP 500: llama runner process has terminated"),
    Case("http503", r"^overloaded: HTTP 503: server busy"),
    Case("http429", r"^rate_limited: HTTP 429: too many requests"),
    Case("empty", r"^empty: HTTP 200 with an empty answer"),
    Case("error_midstream", r"^midstream_error: .*unexpected EOF", continued=True),
    # a cold load slower than first_token but within cold_first_token: waited for, not a hang
    Case("slow_first_token_cold", None, cold=True),
    # a cold load slower than cold_first_token
    Case("slow_first_token_cold_too_slow", rf"^first_token_timeout: no first token within {COLD_FIRST_TOKEN}$",
         cold=True),
    # the same slow start while /api/ps shows the model loaded: that is a hang
    Case("slow_first_token_loaded", NOT_ANSWERING),
    Case("disconnect_midstream", r"^disconnected: the backend closed the connection", continued=True),
    Case("malformed", r"^malformed: not a JSON line", continued=True),
]
VARIANTS = [(api, stream) for api in APIS for stream in (False, True)]


def variant_id(api: str, stream: bool) -> str:
    return f"{api}-{'stream' if stream else 'whole'}"


# Each cold case gets a model of its own on the primary, so /api/ps (which the gateway caches for
# 2s) truthfully says it is not loaded.
COLD = {(c.fault, api, stream): f"cold{i}:1b"
        for i, (c, (api, stream)) in enumerate((c, v) for c in CASES if c.cold for v in VARIANTS)}
PRIMARY_MODELS = ["llama3.2:3b", *COLD.values()]
COLD_ALIASES = {f"cold-{model.split(':')[0]}": [f"primary/{model}", BACKUP, "degraded"] for model in COLD.values()}


class Matrix:
    def __init__(self, fleet: Fleet, key: str) -> None:
        self.fleet, self.key = fleet, key
        self.daemon = fleet.daemon
        self.fallbacks_seen = 0  # cases that passed with a fallback

    async def inject(self, case: Case) -> None:
        p = self.fleet.primary
        if case.fault == "kill":
            p.kill()
        elif case.fault == "sigstop":
            p.suspend()
        elif case.fault == "exit":
            await fault(p, "exit")
        elif case.fault == "refuse":
            await fault(p, "refuse")
        elif case.fault.startswith("slow_first_token"):
            seconds = 3.5 if case.fault.endswith("too_slow") else 1.6
            await fault(p, "slow_first_token", 1, seconds=seconds)
        else:
            if case.fault == "disconnect_midstream":
                await space_tokens(p)  # so some tokens surely go out before the abort (support.SPACED)
            await fault(p, case.fault, 1)  # exactly the one request of this case meets the fault

    async def after(self, case: Case) -> None:
        """Undo what would otherwise keep the primary down while the case is checked."""
        p = self.fleet.primary
        if case.fault == "sigstop":
            p.resume()
        elif not p.alive():
            self.fleet.primary = await respawn(p, PRIMARY_MODELS)
        elif case.fault == "refuse":
            await standin(p, "reset", {})


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    root: Path = tmp_path_factory.mktemp("matrix") / "home"
    fleet = start(root, primary_models=PRIMARY_MODELS, first_token=FIRST_TOKEN, cold_first_token=COLD_FIRST_TOKEN,
                  cooldown="0.2s", max_cooldown="2s", probe="1h", aliases=COLD_ALIASES)
    try:
        yield Matrix(fleet, enroll_key(fleet.daemon, "alpha"))
    finally:
        finish(fleet)


@pytest.fixture
async def clients(matrix: Matrix) -> AsyncIterator[Clients]:
    c = Clients(matrix.daemon.url, matrix.key)
    yield c
    await c.close()


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=[variant_id(*v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[c.fault for c in CASES])
async def test_fault(matrix: Matrix, clients: Clients, case: Case, api: str, stream: bool) -> None:
    await heal(matrix.fleet, clients, PRIMARY_MODELS)
    model = "default"
    primary_ref = PRIMARY
    if case.cold:
        cold = COLD[(case.fault, api, stream)]
        model, primary_ref = f"cold-{cold.split(':')[0]}", f"primary/{cold}"
    messages = [{"role": "user", "content": f"matrix {case.fault} {variant_id(api, stream)}: describe a river"}]

    if case.fault.startswith("slow_first_token"):  # what /api/ps says decides which timeout applies
        loaded = {m.model for m in (await clients.ollama.ps()).models}
        assert (primary_ref in loaded) is not case.cold, loaded

    await matrix.inject(case)
    try:
        reply = await clients.chat(api, model, messages, stream=stream)  # must not raise
    finally:
        await matrix.after(case)

    assert_well_formed(reply)
    ev = await call_event(matrix.daemon, messages)
    assert ev["error"] is None and ev["api"] == api and ev["stream"] is stream and ev["alias"] == model
    assert ev["tokens_in"] > 0 and ev["tokens_out"] > 0
    if case.reason is None:
        assert ev["backend"] == primary_ref, ev
        assert ev["fallbacks"] == [] and ev["continued_after"] == [], ev
        # the cold load (1.6s) outlasted first_token (1s) and was waited for, not taken for a hang
        assert ev["attempts"][0]["ms"] > 1000, ev
    else:
        assert ev["backend"] == BACKUP, ev
        assert len(ev["fallbacks"]) == 1, ev
        failed = ev["fallbacks"][0]
        assert failed["ref"] == primary_ref and failed["outcome"] == "failed", ev
        assert re.search(case.reason, failed["reason"]), failed["reason"]
        assert ev["continued_after"] == ([primary_ref] if case.continued else []), ev
        matrix.fallbacks_seen += 1
    if reply.charter is not None:  # the OpenAI client keeps the gateway's metadata: it agrees with the event
        assert reply.charter["backend"] == ev["backend"]
        assert reply.charter["fallbacks"] == ev["fallbacks"]
        assert reply.charter["continued_after"] == ev["continued_after"]


async def test_no_client_request_failed(matrix: Matrix) -> None:
    """Across everything this module sent, no call failed, and each fault's fallback was recorded."""
    calls = [e["payload"] for e in await model_events(matrix.daemon, 2000) if e["subject"] == "charter.models.calls"]
    assert calls
    assert [c for c in calls if c.get("error")] == []
    fell_back = [c for c in calls if c["fallbacks"]]
    assert len(fell_back) >= matrix.fallbacks_seen
    if matrix.fallbacks_seen == sum(1 for c in CASES if c.reason is not None) * len(VARIANTS):
        assert {(c["api"], c["stream"]) for c in fell_back} == {(OPENAI, False), (OPENAI, True), (OLLAMA, False),
                                                                 (OLLAMA, True)}

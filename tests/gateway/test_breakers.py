"""Circuit breakers: a dead backend is paid for once, then skipped at once until a probe says otherwise.

Each test has its own fleet with a long cooldown (30s) and no periodic probes, so nothing but the
test's own requests could reach the primary while its circuit is open; the stand-in's request
counts (`GET /__standin/state`) then show that nothing did.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

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
    chat_requests,
    circuits,
    fault,
    finish,
    health_events,
    last_seq,
    standin,
    start,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VARIANTS = [(api, stream) for api in APIS for stream in (False, True)]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Fleet, Clients]]:
    f = start(tmp_path / "home", cooldown="30s", max_cooldown="60s", probe="1h")
    agent = await f.daemon.enroll("alpha", "worker")
    clients = Clients(f.daemon.url, agent.api_key or "")
    await agent.close()
    try:
        yield f, clients
    finally:
        await clients.close()
        finish(f)


async def timed(clients: Clients, api: str, model: str, prompt: str, stream: bool = False) -> float:
    started = time.perf_counter()
    reply = await clients.chat(api, model, [{"role": "user", "content": prompt}], stream=stream)
    assert_well_formed(reply)
    return time.perf_counter() - started


async def test_refused_backend_is_skipped_at_once(fleet: tuple[Fleet, Clients]) -> None:
    f, clients = fleet
    baseline = [await timed(clients, OPENAI, BACKUP, f"baseline {i}") for i in range(3)]  # the backup alone
    await fault(f.primary, "refuse")
    seq = await last_seq(f.daemon)

    first = [{"role": "user", "content": "the first call after the primary went down"}]
    assert_well_formed(await clients.chat(OPENAI, "default", first, stream=False))
    ev = await call_event(f.daemon, first)
    assert ev["backend"] == BACKUP
    assert ev["fallbacks"][0]["outcome"] == "failed" and ev["fallbacks"][0]["reason"].startswith("refused: ")
    opened = await health_events(f.daemon, "primary", seq)
    assert [(h["state"], h["reason"].split(":")[0]) for h in opened] == [("open", "refused")]  # at once, not after 2
    circuit = (await circuits(f.daemon))["primary"]
    assert circuit["state"] == "open" and circuit["last_reason"].startswith("refused: ")
    assert circuit["retry_in_s"] > 20

    # The port is back, yet the circuit keeps requests away for its cooldown: the breaker does it.
    await standin(f.primary, "reset", {})
    later = []
    for i, (api, stream) in enumerate(VARIANTS * 2):
        messages = [{"role": "user", "content": f"later call {i}"}]
        started = time.perf_counter()
        assert_well_formed(await clients.chat(api, "default", messages, stream=stream))
        later.append(time.perf_counter() - started)
        ev = await call_event(f.daemon, messages)
        assert ev["backend"] == BACKUP
        assert len(ev["fallbacks"]) == 1
        skipped = ev["fallbacks"][0]
        assert skipped["ref"] == PRIMARY and skipped["outcome"] == "skipped" and skipped["ms"] == 0
        assert re.match(r"^circuit open \(refused: ", skipped["reason"])
    state = await standin(f.primary, "state")
    assert state["requests_total"] == 0, state["requests"]  # not even /api/ps
    assert max(later) < statistics.median(baseline) + 1.0  # no meaningful latency added (generous bound)
    assert (await circuits(f.daemon))["primary"]["state"] == "open"


async def test_hanging_backend_is_paid_for_once(fleet: tuple[Fleet, Clients]) -> None:
    """A backend that accepts and never answers costs one first-token timeout, then nothing."""
    f, clients = fleet
    await timed(clients, OPENAI, PRIMARY, "warm")
    await fault(f.primary, "hang")
    before = await chat_requests(f.primary)
    slow = await timed(clients, OPENAI, "default", "meets the hang")
    assert slow >= 1.4  # it waited for the first token (1.5s) ...
    assert await chat_requests(f.primary) == before + 1
    assert (await circuits(f.daemon))["primary"]["state"] == "open"  # ... and opened the circuit at once
    for i, (api, stream) in enumerate(VARIANTS):
        assert await timed(clients, api, "default", f"after the hang {i}", stream) < 1.0
    assert await chat_requests(f.primary) == before + 1


async def test_soft_failures_open_the_circuit_after_the_threshold(fleet: tuple[Fleet, Clients]) -> None:
    """HTTP 500s are soft: the circuit opens after `failures` (2) in a row, then the primary is skipped."""
    f, clients = fleet
    before = await chat_requests(f.primary)  # the daemon's first probe
    await fault(f.primary, "http500")
    reasons = []
    for i in range(5):
        messages = [{"role": "user", "content": f"soft {i}"}]
        assert_well_formed(await clients.chat(OPENAI, "default", messages, stream=False))
        ev = await call_event(f.daemon, messages)
        assert ev["backend"] == BACKUP
        reasons.append((ev["fallbacks"][0]["outcome"], ev["fallbacks"][0]["reason"].split(":")[0]))
        if i == 0:
            c = (await circuits(f.daemon))["primary"]
            assert c["state"] == "closed" and c["failures"] == 1
    assert reasons == [("failed", "runner_error")] * 2 + [("skipped", "circuit open (runner_error")] * 3
    assert await chat_requests(f.primary) == before + 2
    assert (await circuits(f.daemon))["primary"]["state"] == "open"

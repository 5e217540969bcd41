"""Recovery: a backend that comes back is found by a probe, its circuit closes, and traffic returns to it.

Each test has its own fleet with the harness's defaults (cooldown 1s doubling to 4s, probes every
second). The primary is killed (SIGKILL) or stopped (SIGSTOP) for real; a killed one is restarted
as a new process on the same port, as a supervisor would.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
    finish,
    health_events,
    last_seq,
    respawn,
    start,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VARIANTS = [(api, stream) for api in APIS for stream in (False, True)]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Fleet, Clients]]:
    f = start(tmp_path / "home")  # cooldown 1s, max 4s, probes every 1s, first token 1.5s
    agent = await f.daemon.enroll("alpha", "worker")
    clients = Clients(f.daemon.url, agent.api_key or "")
    await agent.close()
    try:
        yield f, clients
    finally:
        await clients.close()
        finish(f)


async def ask(f: Fleet, clients: Clients, prompt: str, api: str = OPENAI, stream: bool = False) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    assert_well_formed(await clients.chat(api, "default", messages, stream=stream))
    return await call_event(f.daemon, messages)


async def health_state(f: Fleet, seq: int, state: str, timeout: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = [h for h in await health_events(f.daemon, "primary", seq) if h["state"] == state]
        return found[0] if found else None
    return await wait_for(check, timeout, f"a health event: primary {state}", every=0.1)


async def traffic_returns(f: Fleet, clients: Clients, label: str) -> None:
    for i, (api, stream) in enumerate(VARIANTS):
        ev = await ask(f, clients, f"{label} {i}", api, stream)
        assert ev["backend"] == PRIMARY and ev["fallbacks"] == [], ev


async def test_killed_primary_restarted_on_its_port_gets_traffic_back(fleet: tuple[Fleet, Clients]) -> None:
    f, clients = fleet
    assert (await ask(f, clients, "before"))["backend"] == PRIMARY
    seq = await last_seq(f.daemon)
    port = f.primary.port

    f.primary.kill()
    ev = await ask(f, clients, "while it is dead")
    assert ev["backend"] == BACKUP and re.match(r"^(refused|disconnected): ", ev["fallbacks"][0]["reason"])
    opened = await health_state(f, seq, "open", 5)
    assert (await circuits(f.daemon))["primary"]["state"] == "open"
    ev = await ask(f, clients, "still dead")
    assert ev["backend"] == BACKUP

    f.primary = await respawn(f.primary, ["llama3.2:3b"])
    assert f.primary.port == port  # the same address: Charter's config did not change
    closed = await health_state(f, opened["seq"], "closed", 15)
    assert closed["reason"].startswith("recovered (was ")
    circuit = (await circuits(f.daemon))["primary"]
    assert circuit["state"] == "closed" and circuit["failures"] == 0
    assert circuit["probe"]["ok"] is True  # a deep probe: a real (tiny) generation answered
    probed = await chat_requests(f.primary)
    assert probed >= 1  # the probe reached the new process

    await traffic_returns(f, clients, "after the restart")
    assert await chat_requests(f.primary) >= probed + len(VARIANTS)


async def test_stopped_primary_resumed_gets_traffic_back(fleet: tuple[Fleet, Clients]) -> None:
    """SIGSTOP: the port still accepts, nothing answers; the first-token timeout opens the circuit."""
    f, clients = fleet
    assert (await ask(f, clients, "before the stop"))["backend"] == PRIMARY
    seq = await last_seq(f.daemon)
    f.primary.suspend()
    try:
        ev = await ask(f, clients, "while it is stopped")
        assert ev["backend"] == BACKUP
        assert ev["fallbacks"][0]["reason"] == "first_token_timeout: no first token within 1.5s"
        opened = await health_state(f, seq, "open", 5)
        assert (await ask(f, clients, "still stopped"))["backend"] == BACKUP
    finally:
        f.primary.resume()
    await health_state(f, opened["seq"], "closed", 15)
    await traffic_returns(f, clients, "after the resume")

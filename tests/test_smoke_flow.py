"""The happy path through a real daemon: enrol, publish, subscribe, read back, verify."""

from __future__ import annotations

import asyncio

import pytest

from charter.bus.log.sqlite import verify_file
from charter.sdk import Agent

pytestmark = pytest.mark.anyio


async def test_enrolled_agent_publishes_and_observer_sees_it(daemon, agents) -> None:
    alpha, owl = agents["alpha"], agents["owl"]
    received: list = []

    async def watch(first: int) -> None:
        async for ev in owl.subscribe("agents.>", from_seq=first):
            received.append(ev)
            if len(received) == 2:
                return

    # From the next entry on, not "from now": a subscription opened after the publish still sees it.
    head = (await daemon.admin("GET", "/v1/health"))["head_seq"]
    watcher = asyncio.create_task(watch(head + 1))
    r1 = await alpha.publish("agents.alpha.status", {"state": "ready"})
    r2 = await alpha.publish("agents.alpha.status", {"state": "busy"})
    await asyncio.wait_for(watcher, 5)
    assert [e.seq for e in received] == [r1["seq"], r2["seq"]]
    assert received[0].sender == alpha.id
    assert received[1].payload == {"state": "busy"}
    assert verify_file(daemon.home.db_path).ok


async def test_credentials_file_is_private_and_reloads(daemon, agents, tmp_path) -> None:
    alpha = agents["alpha"]
    assert alpha.path is not None
    assert alpha.path.stat().st_mode & 0o777 == 0o600
    again = Agent.load(alpha.path)
    receipt = await again.publish("agents.alpha.hello", {"n": 1})
    assert receipt["seq"] > 0
    charter = await again.charter()
    assert charter["agent_id"] == alpha.id
    assert charter["public_key"] == alpha.creds.key.public.b64
    await again.close()


async def test_durable_consumer_resumes_after_ack(daemon, agents) -> None:
    alpha = agents["alpha"]
    seqs = [(await alpha.publish("agents.alpha.jobs", {"n": i}))["seq"] for i in range(5)]

    async def take(n: int) -> list[int]:
        got = []
        async for ev in alpha.subscribe("agents.alpha.jobs", consumer="jobs"):
            got.append(ev.seq)
            if len(got) == n:
                return got
        return got

    first = await asyncio.wait_for(take(2), 5)
    assert first == seqs[:2]
    await alpha.ack("jobs", first[-1])
    # Unacknowledged entries come again (at-least-once); acknowledged ones do not.
    second = await asyncio.wait_for(take(3), 5)
    assert second == seqs[2:]


async def test_resume_from_sequence(daemon, agents) -> None:
    alpha = agents["alpha"]
    seqs = [(await alpha.publish("agents.alpha.log", {"n": i}))["seq"] for i in range(4)]
    got = []
    async for ev in alpha.subscribe("agents.alpha.log", from_seq=seqs[2]):
        got.append(ev.seq)
        if len(got) == 2:
            break
    assert got == seqs[2:]

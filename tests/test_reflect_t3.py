"""Reflection, `t3-approved` in depth: what makes an approval valid for a T3 action that ran, and what clears one.

A run (an `allow` T3 decision, or a `used` T3 approval) is valid only if the approval it cites was
granted (approved, signed by the root key) before it in the log, for the same agent and action, and
(a window) with the run inside the window. Approving afterwards does not clear a run that had none; the operator's
acknowledgement (`charter.reflect.acknowledged`) or the agent's revocation does. The runs are built the
way Charter makes them (`gov.act`, `gov.wait_approval`), and a faulty emitter is `node.emit` on
`charter.decisions.*`, as the daemon's own code would publish it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from charter.bus.envelope import seal
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.identity.registry import AgentRecord
from charter.node import Node
from charter.policy.approvals import decision_document, sign_decision
from charter.reflect.engine import ACK_SUBJECT, acknowledge, reflect
from tests.conftest import make_home
from tests.test_reflect import enrol

pytestmark = pytest.mark.anyio


def t3(result: dict) -> list[dict]:
    return [c for c in result["contradictions"] if c["truth"] == "t3-approved"]


async def decide(node: Node, approval_id: str, verdict: str = "approve", window_s: float | None = None) -> None:
    await node.gov.decide_approval(sign_decision(node.root_key, decision_document(approval_id, verdict, window_s)))


async def ran(node: Node, agent: AgentRecord, action: str, approval_id: str | None) -> int:
    """A T3 `allow` decision as a faulty part of the daemon would publish it; returns its seq."""
    payload = {"agent_id": agent.id, "action": action, "effect": "allow", "tier": "T3", "rule": "irreversible"}
    if approval_id is not None:
        payload["approval_id"] = approval_id
    return (await node.emit(f"charter.decisions.{agent.name}", payload)).seq


@pytest.fixture
async def node(tmp_path: Path):
    n = Node(make_home(tmp_path / "home"))
    n.capsules.built_at["AI_ALIGNMENT"] = time.time()
    yield n
    await n.close()


async def test_approved_runs_one_shot_and_window_are_no_contradiction(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    asked = await node.gov.act(boss, "deploy.prod", {"v": 1})
    await decide(node, asked["approval_id"])
    assert (await node.gov.wait_approval(boss, asked["approval_id"], 1))["effect"] == "allow"  # `used`
    windowed = await node.gov.act(boss, "deploy.staging", {"v": 2})
    await decide(node, windowed["approval_id"], window_s=60)
    assert (await node.gov.wait_approval(boss, windowed["approval_id"], 1))["effect"] == "allow"
    again = await node.gov.act(boss, "deploy.staging", {"v": 3})  # inside the window: an `allow` decision
    assert again["effect"] == "allow" and again["approval_id"] == windowed["approval_id"]
    assert not t3(await reflect(node))


async def test_a_late_approval_does_not_launder_it_and_an_acknowledgement_clears_it(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    asked = await node.gov.act(boss, "deploy.prod", {"v": 1})
    seq = await ran(node, boss, "deploy.prod", asked["approval_id"])  # ran while the approval was pending
    [c] = t3(await reflect(node))
    assert f"seq {seq}" in c["evidence"] and "not granted before it ran" in c["evidence"]
    assert c["severity"] == "critical" and "charter reflect ack" in c["fix"]
    await decide(node, asked["approval_id"])  # approving afterwards...
    assert (await node.gov.wait_approval(boss, asked["approval_id"], 1))["effect"] == "allow"
    [still] = t3(await reflect(node))  # ...does not clear it (and the legitimate use that follows is fine)
    assert still["evidence"] == c["evidence"] and still["since"] == c["since"]
    with pytest.raises(CharterError):
        await acknowledge(node, seq, "   ")  # the reason is required: it stays in the log
    with pytest.raises(CharterError):
        await acknowledge(node, seq + 1000, "no such finding")
    await acknowledge(node, seq, "hotfix deployed by hand during the outage; approved in the channel")
    assert not t3(await reflect(node))
    entries = await node.log.read(0, 10_000)
    assert any(e.subject == ACK_SUBJECT for e in entries)
    assert any(e.subject == "charter.reflect.resolved" and b"t3-approved" in e.raw for e in entries)


async def test_a_finding_survives_a_restart_and_retention_of_its_entries(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    node = Node(home)
    try:
        boss = await enrol(node, "boss", "coordinator")
        seq = await ran(node, boss, "deploy.prod", None)
        assert "cites no approval" in t3(await reflect(node))[0]["evidence"]
    finally:
        await node.close()
    import sqlite3

    db = sqlite3.connect(home.db_path, isolation_level=None)  # as retention would: the entry leaves charter.db
    db.execute("DELETE FROM log WHERE seq <= ?", (seq,))
    db.close()
    node = Node(home)
    try:
        [c] = t3(await reflect(node))
        assert f"seq {seq}" in c["evidence"]
    finally:
        await node.close()


async def test_a_denied_approval_fires_and_revoking_the_agent_clears_it(node: Node) -> None:
    rogue = await enrol(node, "rogue", "coordinator")
    asked = await node.gov.act(rogue, "secrets.read", {})
    await decide(node, asked["approval_id"], "deny")
    await ran(node, rogue, "secrets.read", asked["approval_id"])
    [c] = t3(await reflect(node))
    assert "denied" in c["evidence"] and "rogue" in c["evidence"]
    await node.set_status("rogue", "suspend", "looking into it")
    assert t3(await reflect(node)), "a suspension is not an answer: the agent may be resumed"
    await node.set_status("rogue", "revoke", "ran secrets.read after a denial")
    assert not t3(await reflect(node))


async def test_an_approval_for_another_agent_or_action_does_not_count(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    other = await enrol(node, "other", "coordinator")
    asked = await node.gov.act(boss, "deploy.prod", {"v": 1})
    await decide(node, asked["approval_id"], window_s=60)
    await ran(node, other, "deploy.prod", asked["approval_id"])
    await ran(node, boss, "secrets.rotate", asked["approval_id"])
    got = sorted(c["evidence"] for c in t3(await reflect(node)))
    assert len(got) == 2
    assert "granted for deploy.prod, not secrets.rotate" in got[0] + got[1]
    assert "granted to another agent" in got[0] + got[1]
    await ran(node, boss, "deploy.prod", asked["approval_id"])  # the right agent and action, in the window
    assert len(t3(await reflect(node))) == 2


async def test_a_window_that_ended_and_a_grant_without_a_signed_decision_do_not_count(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    brief = await node.gov.act(boss, "deploy.staging", {"v": 1})
    await decide(node, brief["approval_id"], window_s=0.2)
    await ran(node, boss, "deploy.staging", brief["approval_id"])  # inside the window: valid
    assert not t3(await reflect(node))
    time.sleep(0.3)
    await ran(node, boss, "deploy.staging", brief["approval_id"])
    [c] = t3(await reflect(node))
    assert "window had ended" in c["evidence"]
    # An `approved` approval event with no decision signed by the root key grants nothing.
    asked = await node.gov.act(boss, "deploy.prod", {"v": 1})
    await node.emit("charter.approvals.boss", {"approval_id": asked["approval_id"], "state": "approved",
                                               "agent_id": boss.id, "action": "deploy.prod", "tier": "T3",
                                               "decision": {"verdict": "approve", "approval_id": asked["approval_id"]}})
    await ran(node, boss, "deploy.prod", asked["approval_id"])
    assert any("signed with the root key" in c["evidence"] for c in t3(await reflect(node)))


async def test_only_the_operator_can_acknowledge_and_never_in_advance(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    head = (await node.log.head())[0]
    # An acknowledgement naming an entry that does not exist yet is not applied when it arrives.
    await node.emit(ACK_SUBJECT, {"truth": "t3-approved", "seq": head + 2, "note": "pre-approved"})
    seq = await ran(node, boss, "deploy.prod", None)
    assert seq == head + 2 and t3(await reflect(node))
    # One that is not signed by the root key is not read (the gate keeps agents off charter.*; here
    # the entry goes straight into the log, as a bug past the gate would put it).
    forged = seal(SigningKey.generate(), sender=boss.id, subject=ACK_SUBJECT,
                  payload={"truth": "t3-approved", "seq": seq, "note": "trust me"})
    await node.log.append([forged])
    assert t3(await reflect(node))


async def test_the_operator_acknowledges_from_the_cli(tmp_path: Path) -> None:
    """`charter reflect` exits 6 on the finding; `charter reflect ack SEQ --note` clears it through
    the daemon; a wrong seq or an empty note is refused with the reason and changes nothing."""
    import json
    import os
    import subprocess
    import sys

    from charter.server.daemon import stop
    from tests.conftest import start_daemon

    home = make_home(tmp_path / "home")
    node = Node(home)
    try:
        boss = await enrol(node, "boss", "coordinator")
        seq = await ran(node, boss, "deploy.prod", None)  # found and remembered by this node
        assert t3(await reflect(node))
    finally:
        await node.close()
    start_daemon(home)
    env = {**os.environ, "CHARTER_HOME": str(home.root)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                              timeout=60)

    try:
        before = cli("reflect", "--json")
        assert before.returncode == 6
        assert any(c["truth"] == "t3-approved" for c in json.loads(before.stdout)["contradictions"])
        wrong = cli("reflect", "ack", str(seq + 1000), "--note", "expected")
        assert wrong.returncode == 4 and f"seq {seq + 1000}" in wrong.stderr
        empty = cli("reflect", "ack", str(seq), "--note", " ")
        assert empty.returncode == 2 and "note" in empty.stderr
        done = cli("reflect", "ack", str(seq), "--note", "the release manager ran it by hand", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["acknowledged"] == seq
        after = json.loads(cli("reflect", "--json").stdout)
        assert not [c for c in after["contradictions"] if c["truth"] == "t3-approved"]
    finally:
        stop(home)

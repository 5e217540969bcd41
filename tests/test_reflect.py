"""Reflection: each built-in truth fires on a contradiction built for it, and clears when it is fixed.

An in-process Node on a real home (real SQLite, real files) so each contradiction can be built the
way it would arise; `charter reflect` through the daemon is covered at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charter.bus.envelope import now_ms, seal
from charter.budget.ledger import Limit
from charter.identity.keys import SigningKey
from charter.identity.registry import AgentRecord
from charter.identity.tokens import token_hash
from charter.node import Node, enroll_proof_message
from charter.policy.approvals import decision_document, sign_decision
from charter.reflect.engine import reflect
from tests.conftest import make_home

pytestmark = pytest.mark.anyio

EXTRA = """
[roles.spender]
publish = ["agents.{name}.>"]
subscribe = ["agents.{name}.>"]
max_tier = "T2"

[roles.brief]
publish = ["agents.{name}.>"]
subscribe = ["agents.{name}.>"]
charter_ttl = "1s"
"""


async def enrol(node: Node, name: str, role: str) -> AgentRecord:
    token, _ = await node.create_invite(role)
    key = SigningKey.generate()
    ts = now_ms()
    proof = key.sign_b64(enroll_proof_message(token_hash(token), name, key.public.b64, ts))
    doc = await node.enroll({"token": token, "name": name, "public_key": key.public.b64, "ts": ts, "proof": proof})
    return node.registry.get(doc["charter"]["agent_id"])


def ids(result: dict) -> set[str]:
    return {c["truth"] for c in result["contradictions"]}


@pytest.fixture
async def node(tmp_path: Path):
    home = make_home(tmp_path / "home")
    home.config_path.write_text(home.config_path.read_text() + EXTRA)
    n = Node(home)
    n.capsules.built_at["AI_ALIGNMENT"] = time.time()  # fresh unless a test says otherwise
    yield n
    await n.close()


async def test_agents_bound_fires_on_a_missing_sandbox_and_clears(node: Node) -> None:
    alpha = await enrol(node, "alpha", "worker")
    assert "agents-bound" not in ids(await reflect(node))
    sandbox = Path(alpha.charter["sandbox"]["path"])
    shutil.rmtree(sandbox)
    result = await reflect(node)
    [c] = [c for c in result["contradictions"] if c["truth"] == "agents-bound"]
    assert "alpha" in c["evidence"] and c["severity"] == "critical" and result["critical"] >= 1
    sandbox.mkdir(mode=0o700)
    assert "agents-bound" not in ids(await reflect(node))


async def test_alias_without_reachable_fallback(node: Node) -> None:
    # The default config has `ollama` (nothing listening) and `openai` (no key) behind `default`.
    node.gateway.router.breakers["ollama"].failure("refused", hard=True)
    result = await reflect(node)
    assert any(c["truth"] == "aliases-fall-back" and "default" in c["evidence"] for c in result["contradictions"])
    node.gateway.router.breakers["ollama"].success()
    result = await reflect(node)
    assert not any(c["truth"] == "aliases-fall-back" and "alias default" in c["evidence"]
                   for c in result["contradictions"])


async def test_spender_without_budget(node: Node) -> None:
    spender = await enrol(node, "spendy", "spender")
    assert any("spendy" in c["evidence"] for c in (await reflect(node))["contradictions"]
               if c["truth"] == "spenders-budgeted")
    node.gov.ledger.set_limit(Limit(f"agent:{spender.id}", "usd", "day", 1_000_000))
    assert "spenders-budgeted" not in ids(await reflect(node))


async def test_overrun_budget(node: Node) -> None:
    alpha = await enrol(node, "alpha", "worker")
    res = node.gov.ledger.reserve(agent_id=alpha.id, role="worker", usd=500_000, tokens=0,
                                  limits=node.gov.limits_for(alpha))
    node.gov.ledger.settle(res.id, usd=500_000, tokens_in=0, tokens_out=0)
    assert "budgets-held" not in ids(await reflect(node))
    # The operator lowers the limit below what was already spent: the budget is now overrun.
    node.gov.ledger.set_limit(Limit(f"agent:{alpha.id}", "usd", "day", 100_000))
    assert "budgets-held" in ids(await reflect(node))
    node.gov.ledger.set_limit(Limit(f"agent:{alpha.id}", "usd", "day", 1_000_000))
    assert "budgets-held" not in ids(await reflect(node))


async def test_services_and_archive_come_from_their_parts(node: Node) -> None:
    now = time.time()
    services = [{"label": "ai.activemirror.cloudflared", "tier": "critical", "status": "ok", "interval": 300,
                 "last_checked": now}]
    archive = {"verified": True, "mirrors": ["/mnt/nas"], "last_sync_at": now, "sync_max_age_s": 3600}

    async def svc() -> list:
        return services

    async def arc() -> dict:
        return archive

    node.state_providers["services"] = svc
    node.state_providers["archive"] = arc
    assert not ids(await reflect(node)) & {"services-up", "archive-verifies"}
    services[0] = {**services[0], "status": "fail"}
    archive["verified"] = False
    archive["first_bad_seq"] = 42
    got = ids(await reflect(node))
    assert {"services-up", "archive-verifies"} <= got
    services[0] = {**services[0], "status": "ok", "last_checked": now - 1000}  # up, but not checked lately
    archive.update(verified=True, last_sync_at=now - 7200)  # verifies, but the sync is stale
    got = await reflect(node)
    evidence = " | ".join(c["evidence"] for c in got["contradictions"])
    assert "not checked within twice its interval" in evidence and "last sync" in evidence
    services[0] = {**services[0], "last_checked": time.time()}
    archive["last_sync_at"] = time.time()
    assert not ids(await reflect(node)) & {"services-up", "archive-verifies"}


async def test_stale_capsule(node: Node) -> None:
    node.capsules.built_at.pop("AI_ALIGNMENT")
    assert "capsule-fresh" in ids(await reflect(node))
    await node.capsules.build("AI_ALIGNMENT")
    assert "capsule-fresh" not in ids(await reflect(node))


async def test_t3_allow_without_an_operator_decision(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    asked = await node.gov.act(boss, "deploy.prod", {"v": 1})
    # Something records a T3 action as allowed, citing an approval nobody has decided.
    await node.emit("charter.decisions.boss", {"agent_id": boss.id, "action": "deploy.prod", "effect": "allow",
                                               "tier": "T3", "rule": "irreversible", "approval_id": asked["approval_id"]})
    assert "t3-approved" in ids(await reflect(node))
    doc = sign_decision(node.root_key, decision_document(asked["approval_id"], "approve", None))
    await node.gov.decide_approval(doc)
    answer = await node.gov.wait_approval(boss, asked["approval_id"], 1)
    assert answer["effect"] == "allow"
    assert "t3-approved" not in ids(await reflect(node))


async def test_expired_charter(node: Node) -> None:
    await enrol(node, "mayfly", "brief")
    time.sleep(1.1)
    assert "charters-current" in ids(await reflect(node))
    await node.renew(node.registry.find("mayfly"), by_operator=True)
    assert "charters-current" not in ids(await reflect(node))


async def test_user_truths_and_memory_of_since(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    home.config_path.write_text(home.config_path.read_text() + """
[[truths]]
id = "two-workers"
claim = "At least two workers are active."
severity = "critical"
fix = "enrol another worker"
expect = 'agents.filter(a, a.role == "worker" && a.status == "active").size() >= 2'
""")
    node = Node(home)
    try:
        node.capsules.built_at["AI_ALIGNMENT"] = time.time()
        await enrol(node, "w1", "worker")
        first = await reflect(node)
        [c] = [c for c in first["contradictions"] if c["truth"] == "two-workers"]
        again = await reflect(node)
        [c2] = [c for c in again["contradictions"] if c["truth"] == "two-workers"]
        assert c2["since"] == c["since"]  # the same contradiction, remembered, not raised twice
        await enrol(node, "w2", "worker")
        assert "two-workers" not in ids(await reflect(node))
        raised = [e for e in await node.log.read(0, 10_000) if e.subject.startswith("charter.reflect.")]
        assert [e.subject for e in raised].count("charter.reflect.contradiction") >= 1
        assert any(e.subject == "charter.reflect.resolved" for e in raised)
    finally:
        await node.close()


async def test_charter_reflect_exit_code_through_the_daemon(daemon) -> None:
    import json

    env = {**os.environ, "CHARTER_HOME": str(daemon.home.root)}

    def run() -> tuple[int, dict]:
        proc = subprocess.run([sys.executable, "-m", "charter", "reflect", "--json"], capture_output=True, text=True,
                              env=env, timeout=60)
        return proc.returncode, json.loads(proc.stdout)

    alpha = await daemon.enroll("alpha", "worker")
    code, data = run()
    assert data["critical"] == 0 and code == 0
    sandbox = Path(alpha.creds.charter["sandbox"]["path"])
    sandbox.rename(sandbox.with_name("moved"))
    code, data = run()
    assert code == 6 and data["critical"] == 1
    assert any(c["truth"] == "agents-bound" and "alpha" in c["evidence"] for c in data["contradictions"])
    sandbox.with_name("moved").rename(sandbox)
    code, data = run()
    assert code == 0 and data["critical"] == 0
    events = await daemon.admin("GET", "/v1/events", params={"pattern": "charter.reflect.>"})
    subjects = [e["envelope"]["subject"] for e in events["events"]]
    assert "charter.reflect.contradiction" in subjects and "charter.reflect.resolved" in subjects
    await alpha.close()

"""Reflection: each built-in truth fires on a contradiction built for it, and clears when it is fixed.

An in-process Node on a real home (real SQLite, real files) so each contradiction can be built the
way it would arise; `charter reflect` through the daemon is covered at the end.

Every built-in truth (`reflect/truths.py`), the test that makes it fire and the fix that clears it:

- agents-bound: `test_agents_bound_fires_on_a_missing_sandbox_and_clears` (the directory is
  recreated), `test_agents_bound_fires_on_a_missing_scoped_view_or_policy_binding_and_clears`
  (also one bound to a policy the daemon does not know; renewing re-derives the binding), and
  through the daemon `test_charter_reflect_exit_code_through_the_daemon`.
- aliases-fall-back: `test_alias_without_reachable_fallback` (a circuit closes again; two models, or
  two backend names, on one server are not a fallback) and
  `test_alias_not_ending_in_degraded_mode` (charter.toml fixed, the daemon restarted).
- spenders-budgeted: `test_spender_without_budget` (a limit is set).
- budgets-held: `test_overrun_budget` (the limit is raised).
- services-up: `test_services_up_with_the_real_supervisor` (a tcp check on a port the test closes
  and reopens; a service not checked within twice its interval) and, with stand-in providers,
  `test_services_and_archive_come_from_their_parts`.
- archive-verifies: `test_archive_verifies_with_the_real_archivist` (a sealed segment tampered with,
  then restored; a mirror sync that grows stale, then runs) and the stand-in test above.
- capsule-fresh: `test_stale_capsule` (never built; built too long ago; rebuilt).
- t3-approved: `test_t3_action_without_an_approval` (a late approval does not clear it; the
  operator's acknowledgement does); the rest of its rules in `tests/test_reflect_t3.py`.
- charters-current: `test_expired_charter` (renewed by the operator).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charter.bus.envelope import now_ms
from charter.budget.ledger import Limit
from charter.identity.keys import SigningKey
from charter.identity.registry import AgentRecord
from charter.identity.tokens import token_hash
from charter.identity.proofs import enroll_proof_message
from charter.node import Node
from charter.policy.approvals import decision_document, sign_decision
from charter.reflect.engine import acknowledge, reflect
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


async def test_agents_bound_fires_on_a_missing_scoped_view_or_policy_binding_and_clears(node: Node) -> None:
    alpha = await enrol(node, "alpha", "worker")
    assert "agents-bound" not in ids(await reflect(node))
    # A stored charter that lost its scopes (one issued by an older version, say): signed, but empty.
    body = {k: v for k, v in alpha.charter.items() if k != "sig"}
    unscoped = node._issue({**body, "scopes": {"publish": [], "subscribe": [], "read": []}})
    node.registry.replace_charter(alpha, unscoped, alpha.public_key)
    [c] = [c for c in (await reflect(node))["contradictions"] if c["truth"] == "agents-bound"]
    assert c["evidence"] == "agent alpha has no scoped view" and "renew" in c["fix"]
    await node.renew(node.registry.find("alpha"), by_operator=True)  # re-derived from the role
    assert "agents-bound" not in ids(await reflect(node))
    # One with no policy binding.
    alpha = node.registry.find("alpha")
    body = {k: v for k, v in alpha.charter.items() if k not in ("sig", "policy")}
    node.registry.replace_charter(alpha, node._issue(body), alpha.public_key)
    [c] = [c for c in (await reflect(node))["contradictions"] if c["truth"] == "agents-bound"]
    assert c["evidence"] == "agent alpha has no policy binding"
    await node.renew(node.registry.find("alpha"), by_operator=True)
    assert "agents-bound" not in ids(await reflect(node))
    # One bound to a policy this daemon does not know (governance would deny it everything).
    alpha = node.registry.find("alpha")
    body = {k: v for k, v in alpha.charter.items() if k != "sig"}
    body["policy"] = {**body["policy"], "hash": "0" * 64}
    node.registry.replace_charter(alpha, node._issue(body), alpha.public_key)
    [c] = [c for c in (await reflect(node))["contradictions"] if c["truth"] == "agents-bound"]
    assert "names a policy not known here" in c["evidence"] and "sha256:000000000000" in c["evidence"]
    await node.renew(node.registry.find("alpha"), by_operator=True)
    assert "agents-bound" not in ids(await reflect(node))


def add_aliases(home_config: Path, lines: str, backends: str = "") -> None:
    """Put alias lines under [models.aliases] (TOML cannot reopen the table) and append backends."""
    text = home_config.read_text()
    text = re.sub(r"(?ms)^\[models\.aliases\]\n.*?(?=^\[)", "[models.aliases]\n" + lines + "\n", text, count=1)
    home_config.write_text(text + backends)


async def test_alias_without_reachable_fallback(tmp_path: Path) -> None:
    # `default` has two models on the local Ollama and one on OpenAI; `twins` names the local Ollama
    # twice (two backend names, one server) and OpenAI. Neither local model is the other's fallback.
    home = make_home(tmp_path / "home")
    add_aliases(home.config_path, 'default = ["ollama/llama3.2:3b", "ollama/qwen2.5:0.5b", "openai/gpt-4o-mini", '
                '"degraded"]\ntwins = ["ollama/llama3.2:3b", "local2/qwen2.5:0.5b", "openai/gpt-4o-mini", "degraded"]\n'
                'local = ["ollama/llama3.2:3b", "ollama/qwen2.5:0.5b", "degraded"]',
                '\n[models.backends.local2]\nkind = "ollama"\nurl = "http://localhost:11434"\n')
    node = Node(home)
    try:
        node.capsules.built_at["AI_ALIGNMENT"] = time.time()

        def fallbacks(result: dict) -> dict[str, str]:
            return {c["evidence"].split()[1]: c["evidence"] for c in result["contradictions"]
                    if c["truth"] == "aliases-fall-back"}

        # All circuits closed: two servers each, both up; `local` (one server) falls back to degraded.
        assert fallbacks(await reflect(node)) == {}
        node.gateway.router.breakers["openai"].failure("refused", hard=True)
        got = fallbacks(await reflect(node))
        assert set(got) == {"default", "twins"}, got  # keyed by backend, both would count 2 models up
        assert "1 of its 2 servers" in got["twins"] and "loopback:11434" in got["twins"]
        node.gateway.router.breakers["openai"].success()
        assert fallbacks(await reflect(node)) == {}
        node.gateway.router.breakers["ollama"].failure("refused", hard=True)
        assert set(fallbacks(await reflect(node))) == {"default"}  # `twins` still has local2 on that server
        node.gateway.router.breakers["local2"].failure("refused", hard=True)
        assert set(fallbacks(await reflect(node))) == {"default", "twins"}
        node.gateway.router.breakers["ollama"].success()
        node.gateway.router.breakers["local2"].success()
        assert fallbacks(await reflect(node)) == {}
    finally:
        await node.close()


async def test_alias_not_ending_in_degraded_mode(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    add_aliases(home.config_path, 'default = ["ollama/llama3.2:3b", "openai/gpt-4o-mini"]\n'
                'solo = ["ollama/llama3.2:3b", "ollama/qwen2.5:0.5b"]')
    node = Node(home)
    try:
        node.capsules.built_at["AI_ALIGNMENT"] = time.time()
        got = sorted(c["evidence"] for c in (await reflect(node))["contradictions"] if c["truth"] == "aliases-fall-back")
        assert got == ["alias default does not end in degraded mode: ollama/llama3.2:3b -> openai/gpt-4o-mini",
                       "alias solo does not end in degraded mode: ollama/llama3.2:3b -> ollama/qwen2.5:0.5b",
                       "alias solo has no fallback: all its models are on loopback:11434"]
    finally:
        await node.close()
    # The fix: the operator edits charter.toml and restarts the daemon.
    add_aliases(home.config_path, 'default = ["ollama/llama3.2:3b", "openai/gpt-4o-mini", "degraded"]\n'
                'solo = ["ollama/llama3.2:3b", "ollama/qwen2.5:0.5b", "degraded"]')
    node = Node(home)
    try:
        node.capsules.built_at["AI_ALIGNMENT"] = time.time()
        result = await reflect(node)
        assert "aliases-fall-back" not in ids(result)
        resolved = [e for e in await node.log.read(0, 10_000) if e.subject == "charter.reflect.resolved"]
        assert len(resolved) == 3  # remembered across the restart, and each published as resolved
    finally:
        await node.close()


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


def listener(port: int = 0) -> socket.socket:
    """A real listening socket on loopback (what a tcp check connects to)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(8)
    return sock


async def test_services_up_with_the_real_supervisor(tmp_path: Path) -> None:
    """A critical service with a real tcp check, checked by the real supervisor: down, up, and not checked lately."""
    server = listener()
    port = server.getsockname()[1]
    home = make_home(tmp_path / "home")
    label = "test.reflect.tcp"
    home.config_path.write_text(home.config_path.read_text() + f"""
[[services]]
label = "{label}"
tier = "critical"
interval = "1s"
check = {{ kind = "tcp", port = {port} }}
""")
    node = Node(home)  # not started: the test runs the checks the schedule would run
    try:
        node.capsules.built_at["AI_ALIGNMENT"] = time.time()

        async def services() -> list[str]:
            return [c["evidence"] for c in (await reflect(node))["contradictions"] if c["truth"] == "services-up"]

        assert f"critical service {label} is unknown" in await services()  # never checked yet
        assert (await node.supervisor.check(label))["state"] == "passing"
        assert await services() == []
        server.close()  # the service goes down
        assert (await node.supervisor.check(label))["state"] == "critical"
        assert await services() == [f"critical service {label} is fail"]
        server = listener(port)  # and comes back
        assert (await node.supervisor.check(label))["state"] == "passing"
        assert await services() == []
        time.sleep(2.1)  # more than twice its interval without a check
        assert await services() == [f"service {label} was not checked within twice its interval (1s)"]
        await node.supervisor.check(label)
        assert await services() == []
    finally:
        server.close()
        await node.close()


async def test_archive_verifies_with_the_real_archivist(tmp_path: Path) -> None:
    """Sealed by the real archivist, a segment tampered with on disk, verified, restored; a mirror goes stale."""
    from charter.archive.layout import Layout
    from tests.archive.conftest import configure, edited_raw, mirrors_toml, rewrite_segment, segment_holding

    home = make_home(tmp_path / "home")
    mirror = tmp_path / "mirror"
    configure(home, segment_entries=10, mirrors=mirrors_toml([mirror]), sync_max_age="3s")
    node = Node(home)  # not started: the test runs what the archivist's schedule would run
    try:
        node.capsules.built_at["AI_ALIGNMENT"] = time.time()

        async def archive() -> list[str]:
            return [c["evidence"] for c in (await reflect(node))["contradictions"] if c["truth"] == "archive-verifies"]

        for i in range(25):
            await node.emit("charter.test.entry", {"n": i, "note": f"entry number {i}"})
        await node.archivist.seal()
        await node.archivist.sync()
        synced = time.time()
        assert (await node.archivist.verify()).ok
        assert await archive() == []
        layout = Layout(home.root / "archive")
        number = segment_holding(layout, 15)
        original = layout.segment_path(number).read_bytes()
        rewrite_segment(layout, number, lambda recs: [(q, h, pr, edited_raw(raw) if q == 15 else raw)
                                                     for q, h, pr, raw in recs])
        report = await node.archivist.verify()
        assert not report.ok and report.first_bad is not None
        got = await archive()
        assert f"the archive does not verify: {report.first_bad}" in got, got
        layout.segment_path(number).write_bytes(original)  # restored (from the mirror, say)
        assert (await node.archivist.verify()).ok
        assert not [e for e in await archive() if "does not verify" in e]
        time.sleep(max(0.0, synced + 3.2 - time.time()))  # the mirror's last sync is now too old
        assert await archive() == ["the archive's last sync to its mirrors is older than 3s"]
        await node.archivist.sync()
        assert await archive() == []
    finally:
        await node.close()


async def test_stale_capsule(node: Node) -> None:
    node.capsules.built_at.pop("AI_ALIGNMENT")
    [c] = [c for c in (await reflect(node))["contradictions"] if c["truth"] == "capsule-fresh"]
    assert "never been built" in c["evidence"]
    await node.capsules.build("AI_ALIGNMENT")
    assert "capsule-fresh" not in ids(await reflect(node))
    max_age = node.config.capsules.max_age
    node.capsules.built_at["AI_ALIGNMENT"] = time.time() - max_age - 60  # built, but too long ago
    [c] = [c for c in (await reflect(node))["contradictions"] if c["truth"] == "capsule-fresh"]
    assert c["evidence"] == f"the AI_ALIGNMENT capsule is older than {max_age:g}s"
    await node.capsules.build("AI_ALIGNMENT")
    assert "capsule-fresh" not in ids(await reflect(node))


async def test_t3_action_without_an_approval(node: Node) -> None:
    boss = await enrol(node, "boss", "coordinator")
    asked = await node.gov.act(boss, "deploy.prod", {"v": 1})
    # Something records a T3 action as allowed, citing an approval nobody has decided yet.
    receipt = await node.emit("charter.decisions.boss", {"agent_id": boss.id, "action": "deploy.prod", "effect": "allow",
                                                         "tier": "T3", "rule": "irreversible",
                                                         "approval_id": asked["approval_id"]})
    assert "t3-approved" in ids(await reflect(node))
    # Approving it afterwards does not make the action that already ran an approved one.
    doc = sign_decision(node.root_key, decision_document(asked["approval_id"], "approve", None))
    await node.gov.decide_approval(doc)
    answer = await node.gov.wait_approval(boss, asked["approval_id"], 1)
    assert answer["effect"] == "allow"
    [c] = [c for c in (await reflect(node))["contradictions"] if c["truth"] == "t3-approved"]
    assert f"seq {receipt.seq}" in c["evidence"] and "not granted before it ran" in c["evidence"]
    # The operator, having looked into it, acknowledges it: an event signed by the root key.
    await acknowledge(node, receipt.seq, "the deploy was expected; the approval came late")
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

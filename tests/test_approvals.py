"""Approvals through the real daemon: a T3 action waits, runs once when approved, never otherwise."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charter.encoding import canonical
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.policy.approvals import decision_document, sign_decision
from tests.conftest import Daemon, make_home, start_daemon

pytestmark = pytest.mark.anyio


class Runner:
    """Stands for the agent's side effect: it runs the action only on an `allow`."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, answer: dict) -> bool:
        if answer["effect"] == "allow":
            self.runs += 1
            return True
        return False


def cli(home, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHARTER_HOME": str(home.root)}
    return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env, timeout=60)


async def events(daemon: Daemon, pattern: str) -> list[dict]:
    answer = await daemon.admin("GET", "/v1/events", params={"pattern": pattern, "limit": 200})
    return [e["envelope"] for e in answer["events"]]


@pytest.fixture
async def boss(daemon):
    agent = await daemon.enroll("boss", "coordinator")
    yield agent
    await agent.close()


async def test_t3_waits_then_runs_exactly_once_when_approved(daemon, boss) -> None:
    run = Runner()
    first = await boss.act("shell.exec", {"command": "make deploy"})
    assert first["effect"] == "approve" and first["decision"]["tier"] == "T3"
    assert not run(first)
    pending = await boss.wait_approval(first["approval_id"], 0.2)
    assert pending["state"] == "pending" and not run(pending)

    waiter = asyncio.create_task(boss.wait_approval(first["approval_id"], 20))
    await asyncio.sleep(0.3)
    listing = json.loads(cli(daemon.home, "approvals", "list", "--json").stdout)
    assert [a["id"] for a in listing] == [first["approval_id"]]
    approved = cli(daemon.home, "approvals", "approve", first["approval_id"], "--note", "ship it")
    assert approved.returncode == 0, approved.stderr
    answer = await asyncio.wait_for(waiter, 10)
    assert run(answer) and answer["state"] == "used"
    again = await boss.wait_approval(first["approval_id"], 0.1)
    assert not run(again) and again["state"] == "used"
    assert run.runs == 1

    # The approval event carries the operator-signed decision that references the request.
    evs = [e for e in await events(daemon, "charter.approvals.boss") if e["payload"]["approval_id"] == first["approval_id"]]
    states = [e["payload"]["state"] for e in evs]
    assert states == ["pending", "approved", "used"]
    decision = evs[1]["payload"]["decision"]
    root = SigningKey.load_pem(daemon.home.root_key_path).public
    from charter.encoding import b64d

    body = {k: v for k, v in decision.items() if k != "sig"}
    assert decision["approval_id"] == first["approval_id"] and decision["note"] == "ship it"
    assert root.verify(b64d(decision["sig"]), canonical(body))
    assert all(e["sender"] == "operator" for e in evs)


async def test_denied_never_runs(daemon, boss) -> None:
    run = Runner()
    first = await boss.act("deploy.prod", {"version": "1.2.3"})
    assert cli(daemon.home, "approvals", "deny", first["approval_id"], "--note", "not today").returncode == 0
    answer = await boss.wait_approval(first["approval_id"], 2)
    assert not run(answer) and answer["effect"] == "deny" and answer["state"] == "denied"
    assert "denied" in answer["reason"]
    # Deciding twice is refused: the first decision stands.
    again = cli(daemon.home, "approvals", "approve", first["approval_id"])
    assert again.returncode == 4 and "conflict" in again.stderr
    assert run.runs == 0


async def test_undecided_approval_expires_into_a_denial(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    home.config_path.write_text(home.config_path.read_text().replace('approval_ttl = "15m"', 'approval_ttl = "1s"'))
    daemon = start_daemon(home)
    try:
        boss = await daemon.enroll("boss", "coordinator")
        run = Runner()
        first = await boss.act("secrets.read", {"name": "prod-db"}, wait=5)
        assert not run(first)
        assert first["effect"] == "deny" and first["state"] == "expired"
        late = cli(home, "approvals", "approve", first["approval_id"])
        assert late.returncode == 4 and "expired" in late.stderr
        states = [e["payload"]["state"] for e in await events(daemon, "charter.approvals.boss")]
        assert states == ["pending", "expired"]
        await boss.close()
    finally:
        from charter.server.daemon import stop

        stop(home)


async def test_only_the_root_key_can_approve(daemon, boss) -> None:
    first = await boss.act("shell.exec", {"command": "rm -rf /tmp/x"})
    aid = first["approval_id"]
    path = f"/v1/admin/approvals/{aid}/decide"
    forged_key = SigningKey.generate()

    # An agent cannot call the operator API at all, even with a perfectly formed document.
    doc = sign_decision(forged_key, decision_document(aid, "approve", None))
    with pytest.raises(CharterError) as exc:
        await boss.http.call("POST", path, json=doc)
    assert exc.value.code == "unauthorized"

    # The operator's channel carrying a document signed by another key is refused on the document.
    with pytest.raises(CharterError) as exc:
        await daemon.admin("POST", path, json=doc)
    assert exc.value.code == "bad_signature"

    # A genuine document altered after signing (a window added) is refused.
    root = SigningKey.load_pem(daemon.home.root_key_path)
    genuine = sign_decision(root, decision_document(aid, "approve", None))
    with pytest.raises(CharterError) as exc:
        await daemon.admin("POST", path, json={**genuine, "window_s": 86400})
    assert exc.value.code == "bad_signature"

    # A genuine document for another approval cannot be replayed onto this one.
    other = sign_decision(root, decision_document("apr_01ARZ3NDEKTSV4RRFFQ69G5FAV", "approve", None))
    with pytest.raises(CharterError) as exc:
        await daemon.admin("POST", path, json=other)
    assert exc.value.code == "bad_request"

    still = await boss.wait_approval(aid, 0.1)
    assert still["state"] == "pending" and still["effect"] == "approve"


async def test_window_approval_covers_the_same_action_for_a_while(daemon, boss) -> None:
    run = Runner()
    first = await boss.act("deploy.staging", {"version": "1"})
    assert cli(daemon.home, "approvals", "approve", first["approval_id"], "--window", "1h").returncode == 0
    assert run(await boss.wait_approval(first["approval_id"], 2))
    for v in ("2", "3"):
        answer = await boss.act("deploy.staging", {"version": v})
        assert run(answer) and answer["approval_id"] == first["approval_id"]
    # The window is for this action only.
    other = await boss.act("deploy.prod", {"version": "3"})
    assert other["effect"] == "approve" and other["approval_id"] != first["approval_id"]
    assert run.runs == 3


async def test_tier_ceiling_and_unknown_actions(daemon) -> None:
    owl = await daemon.enroll("owl", "observer")
    try:
        denied = await owl.act("model.call", {"provider": "openai", "model": "gpt-4o"})
        assert denied["effect"] == "deny" and "T2" in denied["decision"]["reason"]
        unknown = await owl.act("teleport.now", {})
        assert unknown["effect"] == "deny" and unknown["decision"]["rule"] is None
        evs = await events(daemon, "charter.decisions.owl")
        assert [e["payload"]["effect"] for e in evs] == ["deny", "deny"]
    finally:
        await owl.close()


# -- an approved spend reserves its money, once ---------------------------------------------------

RESERVE = "/v1/agent/budget/reserve"


async def reserve(agent, **body) -> dict:
    """The reserve API as it answers: an `approval_required` refusal is a 202 with an `error` body."""
    return await agent.http.call("POST", RESERVE, json={"action": "spend.transfer", **body})


async def test_an_approved_spend_reserves_exactly_once(daemon, boss) -> None:
    await daemon.admin("PUT", "/v1/admin/budget", json={"scope": "agent:boss", "unit": "usd", "limit": 100})
    needs = await reserve(boss, usd=10)  # over $5 at once: T3, the operator approves first
    assert needs["error"]["code"] == "approval_required" and "approval_id" in needs["error"]["message"]
    asked = await boss.act("spend.transfer", {"amount_usd": 10})
    aid = asked["approval_id"]
    with pytest.raises(CharterError) as exc:  # not decided yet
        await reserve(boss, usd=10, approval_id=aid)
    assert exc.value.code == "conflict" and "pending" in exc.value.message

    assert cli(daemon.home, "approvals", "approve", aid).returncode == 0
    with pytest.raises(CharterError) as exc:  # the approval named $10; it does not cover $20
        await reserve(boss, usd=20, approval_id=aid)
    assert exc.value.code == "conflict" and "covers at most $10" in exc.value.message
    with pytest.raises(CharterError) as exc:  # nor another action
        await reserve(boss, action="spend.refund", usd=10, approval_id=aid)
    assert exc.value.code == "conflict" and "spend.transfer" in exc.value.message

    res = await reserve(boss, usd=10, approval_id=aid)
    assert (res["tier"], res["rule"], res["approval_id"], res["usd_micros"]) == ("T3", "large-spend", aid, 10_000_000)
    with pytest.raises(CharterError) as exc:  # one approval, one reservation
        await reserve(boss, usd=10, approval_id=aid)
    assert exc.value.code == "conflict" and res["reservation_id"] in exc.value.message
    again = await boss.wait_approval(aid, 0.1)
    assert again["effect"] == "deny" and again["state"] == "used"
    await boss.settle(res["reservation_id"], usd=10)

    listing = json.loads(cli(daemon.home, "approvals", "list", "--all", "--json").stdout)
    (row,) = [a for a in listing if a["id"] == aid]
    assert (row["state"], row["reservation_id"]) == ("used", res["reservation_id"])
    used = [e["payload"] for e in await events(daemon, "charter.approvals.boss")
            if e["payload"]["approval_id"] == aid and e["payload"]["state"] == "used"]
    assert [u.get("reservation_id") for u in used] == [res["reservation_id"]]
    decisions = [e["payload"] for e in await events(daemon, "charter.decisions.boss")
                 if e["payload"]["action"] == "spend.transfer"]
    # every reserve is a decision event: asked without, asked before the decision, $20, $10 ok, twice
    assert [(d["effect"], d.get("code")) for d in decisions if "usd_micros" in d] == [
        ("approve", "approval_required"), ("approve", "conflict"), ("approve", "conflict"), ("allow", None),
        ("approve", "conflict")]
    ok = [d for d in decisions if d.get("reservation_id")]
    assert [(d["approval_id"], d["reservation_id"]) for d in ok] == [(aid, res["reservation_id"])]


async def test_a_claimed_approval_still_pays_for_its_one_reservation(daemon, boss) -> None:
    """The agent waits with act(wait=...) (which claims the approval), then reserves with its id."""
    await daemon.admin("PUT", "/v1/admin/budget", json={"scope": "agent:boss", "unit": "usd", "limit": 100})
    waiting = asyncio.create_task(boss.act("spend.transfer", {"amount_usd": 7}, wait=20))
    for _ in range(100):
        pending = json.loads(cli(daemon.home, "approvals", "list", "--json").stdout)
        if pending:
            break
        await asyncio.sleep(0.1)
    (p,) = pending
    assert cli(daemon.home, "approvals", "approve", p["id"]).returncode == 0
    answer = await asyncio.wait_for(waiting, 20)
    assert answer["effect"] == "allow" and answer["state"] == "used"
    res = await boss.reserve(action="spend.transfer", usd=7, approval_id=p["id"])  # the SDK names it too
    assert res["approval_id"] == p["id"] and res["usd_micros"] == 7_000_000
    with pytest.raises(CharterError) as exc:
        await reserve(boss, usd=7, approval_id=p["id"])
    assert exc.value.code == "conflict"


async def test_a_window_approval_covers_reservations_while_it_lasts(daemon, boss) -> None:
    await daemon.admin("PUT", "/v1/admin/budget", json={"scope": "agent:boss", "unit": "usd", "limit": 100})
    asked = await boss.act("spend.transfer", {"amount_usd": 6})
    assert cli(daemon.home, "approvals", "approve", asked["approval_id"], "--window", "1h").returncode == 0
    for _ in range(2):  # found without naming it, and not used up
        res = await reserve(boss, usd=6)
        assert res["approval_id"] == asked["approval_id"] and res["tier"] == "T3"
    needs = await reserve(boss, usd=8)  # more than the window's request named
    assert needs["error"]["code"] == "approval_required"

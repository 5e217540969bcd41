"""Sub-agents: delegation only narrows, and ends with the delegator."""

from __future__ import annotations

import pytest

from charter.errors import CharterError
from tests.conftest import Daemon, aclose
from tests.mcp.mcp_helpers import http_client

pytestmark = pytest.mark.anyio


async def test_a_sub_agent_asking_for_more_than_its_parent_is_refused_at_enrolment(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")  # publishes agents.alpha.>, tasks.results.>, ...; T2
    try:
        asks = [
            ({"scopes": {"publish": ["tasks.>"]}}, "publish pattern 'tasks.>' is not within the parent's publish scope"),
            ({"scopes": {"publish": ["agents.>"]}}, "'agents.>'"),
            ({"scopes": {"publish": ["agents.{name}.>"]}}, "'agents.helper.>'"),  # its own name is not the parent's
            ({"scopes": {"subscribe": ["charter.>"]}}, "subscribe pattern 'charter.>'"),
            ({"max_tier": "T3"}, "max_tier T3 is above the parent's T2"),
            ({"budget_usd_per_day": 5.0}, "budget_usd_per_day 5 is above the parent's 1"),
        ]
        for kw, why in asks:
            with pytest.raises(CharterError) as info:
                await alpha.enroll_subagent("helper", **kw)
            assert info.value.code == "out_of_scope" and why in info.value.message, (kw, info.value)
        assert await alpha.subagents() == []
        agents = (await daemon.admin("GET", "/v1/admin/agents"))["agents"]
        assert [a["name"] for a in agents] == ["alpha"]  # nothing was enrolled

        # An observer (T0) may not delegate at all: agents.delegate is T2.
        owl = await daemon.enroll("owl", "observer")
        with pytest.raises(CharterError) as info:
            await owl.enroll_subagent("owlet")
        assert info.value.code == "policy_denied" and "agents.delegate" in info.value.message
        await owl.close()
    finally:
        await aclose(alpha)


async def test_a_narrower_sub_agent_works_and_the_parents_revocation_refuses_its_next_call(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    helper = await alpha.enroll_subagent(
        "helper", daemon.home.root.parent / "helper.creds.json",
        scopes={"publish": ["agents.alpha.helper.>"], "subscribe": ["agents.alpha.>"]}, max_tier="T1",
        budget_usd_per_day=0.5)
    try:
        c = helper.creds.charter
        assert c["parent"] == {"agent_id": alpha.id, "name": "alpha"}
        assert c["scopes"] == {"publish": ["agents.alpha.helper.>"], "subscribe": ["agents.alpha.>"], "read": []}
        assert (c["max_tier"], c["budget"]["usd_per_day"], c["role"]) == ("T1", 0.5, "worker")
        assert c["policy"] == alpha.creds.charter["policy"] and c["expires_at"] <= alpha.creds.charter["expires_at"]
        assert [s["name"] for s in await alpha.subagents()] == ["helper"]

        # Inside its narrower view: yes. The parent's wider view: no. Its tier: T1.
        assert (await helper.publish("agents.alpha.helper.status", {"up": True}))["seq"] > 0
        with pytest.raises(CharterError) as info:
            await helper.publish("agents.alpha.status", {"up": True})
        assert info.value.code == "out_of_scope"
        assert (await helper.act("fs.write", {"path": "x"}))["effect"] == "allow"  # T1
        paid = await helper.act("model.call", {"provider": "openai", "model": "gpt-4o-mini"})  # T2
        assert paid["effect"] == "deny" and "up to T1" in paid["decision"]["reason"]

        # Renewing keeps the narrowing (it is not re-derived from the role).
        renewed = await helper.renew()
        assert renewed["scopes"]["publish"] == ["agents.alpha.helper.>"] and renewed["max_tier"] == "T1"

        # Its MCP bearer key works, until the parent goes.
        async with http_client(daemon.url, helper.api_key) as mcp:
            me = (await mcp.call_tool("whoami", {})).structured_content
            assert me["parent"]["name"] == "alpha"

        # Revoking the parent revokes the child: its very next call is refused.
        await daemon.admin("POST", "/v1/admin/agents/alpha/revoke", json={"reason": "done"})
        with pytest.raises(CharterError) as info:
            await helper.publish("agents.alpha.helper.status", {"up": False})
        assert info.value.code == "revoked"
        with pytest.raises(CharterError) as info:
            await helper.act("fs.write", {"path": "x"})
        assert info.value.code == "revoked"
        with pytest.raises(BaseException) as err:
            async with http_client(daemon.url, helper.api_key):
                pass
        assert "revoked" in repr(err.value)
        shown = await daemon.admin("GET", "/v1/admin/agents/helper")
        assert shown["status"] == "revoked" and shown["reason"] == "parent alpha was revoked: done"
    finally:
        await aclose(alpha, helper)


async def test_a_sub_agent_spends_from_its_parents_budget_too(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")  # $1.00 a day
    helper = await alpha.enroll_subagent("helper")  # defaults: the parent's own limits
    try:
        r = await helper.reserve(usd=0.8)
        with pytest.raises(CharterError) as info:
            await alpha.reserve(usd=0.5)  # only $0.20 of the parent's day is left
        assert info.value.code == "budget_exceeded"
        await helper.settle(r["reservation_id"], usd=0.1)
        assert (await alpha.reserve(usd=0.5))["usd"] == 0.5
        scopes = {lim["scope"] for lim in (await helper.budget())["limits"]}
        assert scopes == {f"agent:{helper.id}", f"agent:{alpha.id}"}
    finally:
        await aclose(alpha, helper)

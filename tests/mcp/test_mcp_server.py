"""Charter as an MCP server, with the official MCP client, over stdio and over streamable HTTP.

Each tool works within the agent's scope and is refused outside it with a clear error; the resources
are the agent's own; hand-offs go from one agent to the next, and only the named agent takes them.
"""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import Daemon, aclose
from tests.mcp.mcp_helpers import charter_client, http_client, text

pytestmark = pytest.mark.anyio
TOOLS = {"publish", "recent_events", "capsule", "act", "budget", "whoami", "handoff", "handoffs", "pickup", "complete"}


def refused(result, code: str) -> str:
    """The tool result is an error naming `code`; returns its text."""
    assert result.is_error, result
    assert result.structured_content["error"]["code"] == code, result.structured_content
    assert text(result).startswith(f"{code}: "), text(result)
    return text(result)


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_each_tool_works_within_scope_and_is_refused_outside_it(daemon: Daemon, transport: str) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    try:
        async with charter_client(transport, daemon.url, alpha) as c:
            listed = (await c.list_tools()).tools
            assert {t.name for t in listed} == TOOLS
            assert all(t.description and t.input_schema["type"] == "object" for t in listed)

            # publish: inside agents.alpha.> yes; tasks.assign is outside a worker's publish scope.
            ok = await c.call_tool("publish", {"subject": "agents.alpha.notes", "payload": {"n": 1}, "kind": "note"})
            assert not ok.is_error and ok.structured_content["seq"] > 0
            why = refused(await c.call_tool("publish", {"subject": "tasks.assign", "payload": {}}), "out_of_scope")
            assert "tasks.assign" in why and "alpha" in why
            refused(await c.call_tool("publish", {"subject": "agents.alpha..x", "payload": 1}), "malformed")

            # recent_events: its own subjects yes, another agent's no.
            seen = await c.call_tool("recent_events", {"pattern": "agents.alpha.>"})
            events = seen.structured_content["events"]
            assert [e["payload"] for e in events if e["subject"] == "agents.alpha.notes"] == [{"n": 1}]
            mine = events[-1]
            if transport == "stdio":  # signed by the agent's own key
                assert mine["sender"] == alpha.id and "on_behalf_of" not in mine
            else:  # the daemon published it for the agent that proved itself with its bearer key
                assert mine["sender"] == "operator" and mine["on_behalf_of"] == {"agent_id": alpha.id, "name": "alpha"}
            refused(await c.call_tool("recent_events", {"pattern": "agents.bob.>"}), "out_of_scope")
            everything = await c.call_tool("recent_events", {"limit": 5})  # every pattern it subscribes to
            assert not everything.is_error and "agents.alpha.>" in everything.structured_content["patterns"]

            # capsule: its own, as Markdown.
            cap = await c.call_tool("capsule", {})
            assert not cap.is_error and "alpha" in text(cap) and text(cap).lstrip().startswith("---")

            # act: the policy's answer, with its rule; an unknown action is denied (fail closed).
            a = (await c.call_tool("act", {"action": "fs.write", "attrs": {"path": "notes.txt"}})).structured_content
            assert (a["effect"], a["decision"]["rule"]) == ("allow", "sandbox-files")
            d = (await c.call_tool("act", {"action": "teleport.now"})).structured_content
            assert d["effect"] == "deny" and "unknown actions are denied" in d["decision"]["reason"]
            t3 = (await c.call_tool("act", {"action": "deploy.prod"})).structured_content
            assert t3["effect"] == "deny" and "T3" in t3["decision"]["reason"]  # above a worker's T2
            refused(await c.call_tool("act", {"action": "fs.write", "wait_seconds": 9999}), "bad_request")

            # budget and whoami: its own.
            b = (await c.call_tool("budget", {})).structured_content
            assert b["agent_id"] == alpha.id and b["limits"][0]["scope"] == f"agent:{alpha.id}"
            me = (await c.call_tool("whoami", {})).structured_content
            assert (me["name"], me["role"], me["max_tier"]) == ("alpha", "worker", "T2")

            # resources: the capsule and the charter.
            uris = {str(r.uri) for r in (await c.list_resources()).resources}
            assert uris == {"charter://agent/capsule", "charter://agent/charter"}
            charter = (await c.read_resource("charter://agent/charter")).contents[0]
            assert charter.mime_type == "application/json" and alpha.id in charter.text
            capsule = (await c.read_resource("charter://agent/capsule")).contents[0]
            assert capsule.mime_type == "text/markdown" and "alpha" in capsule.text
            with pytest.raises(MCPError, match="no resource"):
                await c.read_resource("charter://agent/secrets")
            with pytest.raises(MCPError, match="unknown tool"):
                await c.call_tool("shell", {})

            # Revoked: the very next call is refused, with the reason.
            await daemon.admin("POST", "/v1/admin/agents/alpha/revoke", json={"reason": "test"})
            if transport == "stdio":
                refused(await c.call_tool("publish", {"subject": "agents.alpha.notes", "payload": 2}), "revoked")
                refused(await c.call_tool("budget", {}), "revoked")
            else:
                with pytest.raises(MCPError, match="revoked: agent alpha was revoked"):
                    await c.call_tool("budget", {})
    finally:
        await aclose(alpha)


async def test_http_needs_the_agents_bearer_key(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    try:
        for key, why in ((None, "needs `Authorization: Bearer"), ("chk_not-a-key", "unknown or replaced API key")):
            with pytest.raises(BaseException) as info:
                async with http_client(daemon.url, key):
                    pass
            assert why in repr(info.value)
        # The signing key is not a bearer key, and a rotated bearer key stops working.
        old = alpha.api_key
        await alpha.rotate_api_key()
        with pytest.raises(BaseException) as info:
            async with http_client(daemon.url, old):
                pass
        assert "unknown or replaced API key" in repr(info.value)
        async with http_client(daemon.url, alpha.api_key) as c:
            assert (await c.call_tool("whoami", {})).structured_content["name"] == "alpha"
    finally:
        await aclose(alpha)


async def test_hand_off_pick_up_complete_between_agents_and_transports(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    bob = await daemon.enroll("bob", "worker")
    carol = await daemon.enroll("carol", "worker")
    owl = await daemon.enroll("owl", "observer")
    try:
        async with (charter_client("stdio", daemon.url, alpha) as a, charter_client("http", daemon.url, bob) as b,
                    charter_client("http", daemon.url, carol) as c, charter_client("http", daemon.url, owl) as o):
            made = await a.call_tool("handoff", {"to": "bob", "title": "Ship the parser",
                                                 "done": ["grammar", "tests for numbers"], "pending": "error messages",
                                                 "context": {"branch": "parser"}})
            assert not made.is_error, text(made)
            hid = made.structured_content["id"]
            h = made.structured_content["handoff"]
            assert (h["state"], h["from"], h["to"], h["pending"]) == ("open", "alpha", "bob", ["error messages"])

            # Bob sees it addressed to him; carol does not, unless she asks for anyone's.
            assert [x["id"] for x in (await b.call_tool("handoffs", {})).structured_content["handoffs"]] == [hid]
            assert (await c.call_tool("handoffs", {})).structured_content["handoffs"] == []
            assert len((await c.call_tool("handoffs", {"involving": "anyone"})).structured_content["handoffs"]) == 1

            # Only bob may pick it up; an observer may not even hand off (its scope has no hand-off subject).
            assert "is for bob, not carol" in refused(await c.call_tool("pickup", {"id": hid}), "conflict")
            refused(await o.call_tool("handoff", {"to": "bob", "title": "x", "pending": "y"}), "out_of_scope")
            refused(await b.call_tool("complete", {"id": hid, "summary": "done"}), "conflict")  # not picked up yet
            taken = await b.call_tool("pickup", {"id": hid, "note": "on it"})
            assert not taken.is_error, text(taken)
            t = taken.structured_content["handoff"]
            assert (t["state"], t["picked_up_by"], t["done"]) == ("picked_up", "bob", ["grammar", "tests for numbers"])
            assert "already picked up by bob" in refused(await b.call_tool("pickup", {"id": hid}), "conflict")

            # A forged step (carol writing into a hand-off as bob) is refused by the bus itself.
            forged = await c.call_tool("publish", {"subject": f"tasks.handoffs.{hid}.bob", "payload": {"summary": "x"},
                                                   "kind": "complete"})
            refused(forged, "out_of_scope")

            done = await b.call_tool("complete", {"id": hid, "summary": "error messages written", "pending": []})
            assert done.structured_content["handoff"]["state"] == "completed"
            seen = (await a.call_tool("handoffs", {"state": "completed"})).structured_content["handoffs"]
            assert [(x["id"], x["outcome"]["summary"]) for x in seen] == [(hid, "error messages written")]
            assert [s["step"] for s in seen[0]["history"]] == ["handoff", "pickup", "complete"]
            refused(await a.call_tool("pickup", {"id": "not-an-id"}), "bad_request")
            refused(await a.call_tool("handoff", {"to": "Bob!", "title": "x", "pending": "y"}), "bad_request")
    finally:
        await aclose(alpha, bob, carol, owl)

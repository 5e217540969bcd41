"""A snapshot of the live system: what capsules show and what reflection checks.

Built from the parts the Node has (agents, budgets, approvals, models, the log). Parts that come
later (the supervisor's services, the archivist) add themselves through `node.state_providers`, a
dict of name -> async callable returning JSON-able data, so nothing here changes when they do.
"""

from __future__ import annotations

import datetime as dt
import socket
from typing import TYPE_CHECKING, Any

from charter import __version__
from charter.bus.log.scan import read_matching
from charter.encoding import loads
from charter.identity.registry import OPERATOR_ID

if TYPE_CHECKING:
    from charter.identity.registry import AgentRecord
    from charter.node import Node

NOTABLE = ("charter.agents.>", "charter.approvals.>", "charter.models.health", "charter.budget.alerts",
           "charter.services.>", "charter.archive.>", "charter.reflect.>", "charter.invites.>")


def iso(ms: int | float | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone().isoformat(timespec="seconds")


def agent_view(agent: AgentRecord) -> dict[str, Any]:
    c = agent.charter
    return {"id": agent.id, "name": agent.name, "role": agent.role, "status": agent.status,
            "reason": agent.reason, "max_tier": c.get("max_tier"), "policy": c.get("policy"),
            "scopes": c.get("scopes"), "sandbox": c.get("sandbox"), "budget": c.get("budget"),
            "expires_at": iso(agent.expires_at), "expires_at_ms": agent.expires_at, "parent": c.get("parent")}


async def recent_events(node: Node, patterns: tuple[str, ...], limit: int, *, scan: int = 20_000,
                        sender: str | None = None) -> list[dict[str, Any]]:
    """The last `limit` entries matching any pattern (for an agent: the patterns of its view), oldest first.

    Looks back at most `scan` entries from the head, filtered by the log itself where it can
    (`bus.log.scan`; the operator's own events off an index), so its cost does not grow with the
    log nor with the agents' traffic.
    """
    head = (await node.log.head())[0]
    entries = await read_matching(node.log, patterns, after=max(head - scan, 0), upto=head, limit=limit,
                                  newest_first=True, sender=sender)
    out = []
    for e in reversed(entries):
        env = loads(e.raw)
        out.append({"seq": e.seq, "ts": iso(env["ts"]), "subject": e.subject, "sender": env["sender"],
                    "kind": env["kind"], "payload": env["payload"]})
    return out


async def live_state(node: Node, *, events: int = 25) -> dict[str, Any]:
    gov = node.gov
    agents = node.registry.all()
    names = {a.id: a.name for a in agents}
    budgets = []
    for row in await gov.budget_overview(agents):
        scale = 1e6 if row["unit"] == "usd" else 1
        budgets.append({"scope": row["scope"], "name": names.get(row["scope"][6:], row["scope"]),
                        "unit": row["unit"], "period": row["period"], "period_key": row["period_key"],
                        "limit": row["hard"] / scale, "used": (row["committed"] + row["reserved"]) / scale,
                        "left": row["left"] / scale, "overrun": row["committed"] > row["hard"]})
    seq, head = node.log.head_sync()
    state: dict[str, Any] = {
        "generated_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "charter_version": __version__,
        "log": {"head_seq": seq, "head_hash": head.hex()},
        "agents": [agent_view(a) for a in agents],
        "budgets": budgets,
        "approvals_pending": [a.to_dict() for a in gov.approvals.list("pending")],
        "models": {"aliases": node.config.models.aliases, "backends": node.gateway.router.health()},
        "policies": {p.id: p.binding() for p in gov.current.values()},
        "recent_events": await recent_events(node, NOTABLE, events, scan=1_000_000, sender=OPERATOR_ID),
    }
    for name, provider in node.state_providers.items():
        try:
            state[name] = await provider()
        except Exception as exc:  # noqa: BLE001 - a broken part shows as such, it does not hide the rest
            state[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return state


async def agent_state(node: Node, agent: AgentRecord, *, events: int = 25) -> dict[str, Any]:
    """Only what the agent's scoped view allows: its charter, its budget, events it may subscribe to."""
    gov = node.gov
    seq, _ = node.log.head_sync()
    budget = await gov.budget_view(agent)
    return {
        "generated_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "charter_version": __version__,
        "log": {"head_seq": seq},
        "agent": agent_view(agent),
        "budget": [{"unit": r["unit"], "period": r["period"], "limit": r["hard"] / (1e6 if r["unit"] == "usd" else 1),
                    "left": r["left"] / (1e6 if r["unit"] == "usd" else 1)} for r in budget["limits"]],
        "free_models": budget["free_models"],
        "approvals_pending": [a.to_dict() for a in gov.approvals.list("pending") if a.agent_id == agent.id],
        "recent_events": await recent_events(node, agent.subscribe.patterns, events),
    }

"""The tools Charter offers an enrolled agent over MCP, independent of the transport.

Each tool acts as the agent and is checked like the agent's own calls: publishing by the bus (scope
and the `bus.publish` policy), reading by the agent's subscribe scope and `state.read`, the capsule
by `capsule.read`, the budget by `budget.read`, and `act` by whatever action it names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from charter.errors import BAD_REQUEST, CONFLICT, CharterError
from charter.mcp import handoff as ho
from charter.mcp.backend import MAX_WAIT, Backend, require_allowed

Handler = Callable[[Backend, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Text:
    """A tool result whose text for the model is `text` (Markdown, say), with `data` as structured content."""

    text: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    input_schema: dict[str, Any]
    handler: Handler
    read_only: bool = False


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


STR = {"type": "string"}
ITEMS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value:
        raise CharterError(BAD_REQUEST, f"{key} is a non-empty string", key)
    return value


def _int(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = args.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise CharterError(BAD_REQUEST, f"{key} is a whole number from {lo} to {hi}", key)
    return value


# -- the tools -------------------------------------------------------------------------------------


async def t_publish(b: Backend, args: dict[str, Any]) -> Any:
    if "payload" not in args:
        raise CharterError(BAD_REQUEST, "payload is required (any JSON value)", "payload")
    receipt = await b.publish(_str(args, "subject"), args["payload"], _str(args, "kind", "event"))
    return {"published": True, **receipt}


async def t_recent(b: Backend, args: dict[str, Any]) -> Any:
    limit = _int(args, "limit", 20, 1, 500)
    pattern = args.get("pattern")
    if pattern is None:
        patterns = list((await b.charter()).get("scopes", {}).get("subscribe", []))
    else:
        patterns = [_str(args, "pattern")]
    for p in patterns:
        require_allowed(await b.check("state.read", {"pattern": p}), "state.read")
    events: dict[int, dict[str, Any]] = {}
    for p in patterns:
        for e in await b.recent(p, limit):
            events[e["seq"]] = e
    return {"patterns": patterns, "events": [events[s] for s in sorted(events)[-limit:]]}


async def t_capsule(b: Backend, args: dict[str, Any]) -> Any:
    require_allowed(await b.check("capsule.read"), "capsule.read")
    doc = await b.capsule()
    return Text(str(doc.get("markdown") or ""), doc)


async def t_act(b: Backend, args: dict[str, Any]) -> Any:
    attrs = args.get("attrs") or {}
    if not isinstance(attrs, dict):
        raise CharterError(BAD_REQUEST, "attrs is a JSON object", "attrs")
    wait = args.get("wait_seconds", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT:
        raise CharterError(BAD_REQUEST, f"wait_seconds is a number from 0 to {MAX_WAIT:g}", "wait_seconds")
    return await b.act(_str(args, "action"), attrs, float(wait))


async def t_budget(b: Backend, args: dict[str, Any]) -> Any:
    require_allowed(await b.check("budget.read"), "budget.read")
    return await b.budget()


async def t_whoami(b: Backend, args: dict[str, Any]) -> Any:
    require_allowed(await b.check("state.read", {"pattern": "charter"}), "state.read")
    c = await b.charter()
    return {k: c.get(k) for k in ("agent_id", "name", "role", "scopes", "max_tier", "policy", "budget",
                                  "sandbox", "expires_at", "parent")}


async def _load(b: Backend, hid: str) -> ho.Handoff:
    return ho.require(ho.fold(await b.recent(f"{ho.PREFIX}.{hid}.*", 500)), hid)


async def t_handoff(b: Backend, args: dict[str, Any]) -> Any:
    body = ho.handoff_payload(args)
    hid = ho.new_id()
    receipt = await b.publish(ho.subject(hid, b.name), body, ho.HANDOFF)
    return {"id": hid, "seq": receipt["seq"], "subject": ho.subject(hid, b.name), "handoff": (await _load(b, hid)).to_dict()}


async def t_handoffs(b: Backend, args: dict[str, Any]) -> Any:
    state = args.get("state", "open")
    if state not in ("open", "picked_up", "completed", "all"):
        raise CharterError(BAD_REQUEST, "state is open, picked_up, completed or all", "state")
    who = args.get("involving", "me")
    if who not in ("me", "anyone"):
        raise CharterError(BAD_REQUEST, "involving is me or anyone", "involving")
    limit = _int(args, "limit", 50, 1, 500)
    require_allowed(await b.check("state.read", {"pattern": ho.ALL}), "state.read")
    me = b.name
    found = ho.fold(await b.recent(ho.ALL, 5000)).values()
    rows = [h for h in found if (state == "all" or h.state == state)
            and (who == "anyone" or me in (h.to, h.author, h.picked_up_by))]
    return {"handoffs": [h.to_dict() for h in rows[-limit:]]}


async def t_pickup(b: Backend, args: dict[str, Any]) -> Any:
    hid = ho.check_id(args.get("id"))
    h = await _load(b, hid)
    ho.check_pickup(h, b.name)
    await b.publish(ho.subject(hid, b.name), ho.pickup_payload(args), ho.PICKUP)
    h = await _load(b, hid)
    if h.picked_up_by != b.name:  # someone's pickup reached the log first
        raise CharterError(CONFLICT, f"hand-off {hid} was picked up by {h.picked_up_by} first", "id")
    return {"handoff": h.to_dict()}


async def t_complete(b: Backend, args: dict[str, Any]) -> Any:
    hid = ho.check_id(args.get("id"))
    body = ho.complete_payload(args)
    h = await _load(b, hid)
    ho.check_complete(h, b.name)
    await b.publish(ho.subject(hid, b.name), body, ho.COMPLETE)
    return {"handoff": (await _load(b, hid)).to_dict()}


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec("publish", "Publish an event",
             "Publish a JSON payload to a subject on the Charter bus, as this agent. The subject must be "
             "inside the agent's publish scope (see whoami); e.g. agents.<your name>.notes.",
             _obj({"subject": {**STR, "description": "dot-separated subject, e.g. agents.alpha.notes"},
                   "payload": {"description": "any JSON value"},
                   "kind": {**STR, "description": "lowercase token, default \"event\""}}, ["subject", "payload"]),
             t_publish),
    ToolSpec("recent_events", "Read recent events",
             "The most recent events on the bus that this agent may see. Without a pattern, every pattern the "
             "agent subscribes to. Patterns use NATS wildcards: * one token, > the rest.",
             _obj({"pattern": {**STR, "description": "subject pattern, e.g. tasks.>"},
                   "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20}}),
             t_recent, read_only=True),
    ToolSpec("capsule", "This agent's capsule",
             "This agent's context capsule (Markdown), rebuilt now from what its view allows: charter, "
             "budget, pending approvals, recent events.", _obj({}), t_capsule, read_only=True),
    ToolSpec("act", "Ask whether an action may run",
             "Ask the agent's bound policy whether an action may run, e.g. action \"deploy.prod\" with attrs "
             "{\"version\": \"1.4\"}. effect is allow, deny, or approve (an operator must approve it first). "
             "With wait_seconds, an action that needs an approval waits that long for the operator's decision; "
             "approved, it comes back allow (a one-shot approval is used up by this call). Then do the action.",
             _obj({"action": {**STR, "description": "action name, e.g. fs.write, deploy.prod"},
                   "attrs": {"type": "object", "description": "attributes the policy's conditions can see"},
                   "wait_seconds": {"type": "number", "minimum": 0, "maximum": MAX_WAIT, "default": 0}}, ["action"]),
             t_act),
    ToolSpec("budget", "Show the budget",
             "This agent's budget limits, what is used and left in each period, and the free local models.",
             _obj({}), t_budget, read_only=True),
    ToolSpec("whoami", "Who am I",
             "This agent's identity and charter: name, id, role, publish/subscribe scopes, max tier, policy, "
             "budget, sandbox, expiry.", _obj({}), t_whoami, read_only=True),
    ToolSpec("handoff", "Hand work off to another agent",
             "Hand work off to the next agent: what was done, what is pending, and who continues. Returns the "
             "hand-off id; the next agent finds it with `handoffs` and takes it with `pickup`.",
             _obj({"to": {**STR, "description": "the next agent's name"},
                   "title": {**STR, "description": "one line: what this work is"},
                   "done": {**ITEMS, "description": "what was done"},
                   "pending": {**ITEMS, "description": "what is still to do"},
                   "notes": STR, "context": {"type": "object", "description": "any JSON the next agent needs"}},
                  ["to", "title", "pending"]),
             t_handoff),
    ToolSpec("handoffs", "List hand-offs",
             "Hand-offs in this agent's view: by default the open ones that involve it (to or from it).",
             _obj({"state": {"enum": ["open", "picked_up", "completed", "all"], "default": "open"},
                   "involving": {"enum": ["me", "anyone"], "default": "me"},
                   "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}}),
             t_handoffs, read_only=True),
    ToolSpec("pickup", "Pick up a hand-off",
             "Take a hand-off addressed to this agent; returns what was done and what is pending.",
             _obj({"id": STR, "note": STR}, ["id"]), t_pickup),
    ToolSpec("complete", "Complete a hand-off",
             "Report the outcome of a hand-off this agent picked up.",
             _obj({"id": STR, "summary": STR, "done": ITEMS, "pending": ITEMS,
                   "result": {"type": "object"}}, ["id", "summary"]),
             t_complete),
)
BY_NAME = {t.name: t for t in TOOLS}

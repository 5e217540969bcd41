"""Work hand-offs between agents, kept as events on the bus.

Every step of a hand-off is one event on `tasks.handoffs.<id>.<actor>`, where the last token is
the name of the agent taking the step:

    kind "handoff"   the author: what was done, what is pending, and the next agent (`to`)
    kind "pickup"    the next agent takes it
    kind "complete"  the agent that picked it up reports the outcome

The last token is proven by scope, not claimed in a payload: a worker's role publishes
`tasks.handoffs.*.{name}`, so only `alpha` can write `tasks.handoffs.<id>.alpha`, and the bus
refuses anything else as `out_of_scope`. (A coordinator publishes `tasks.>`, so it may act for
others: that is what coordinators are for.) The state of a hand-off is a fold of its events in log
order; a step that does not fit the state (a second pickup, a pickup by someone else, completing
what one did not pick up) is ignored by the fold and refused by the tools.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ulid import ULID

from charter.errors import BAD_REQUEST, CONFLICT, NOT_FOUND, CharterError

PREFIX = "tasks.handoffs"
ALL = PREFIX + ".>"
HANDOFF, PICKUP, COMPLETE = "handoff", "pickup", "complete"
OPEN, PICKED, DONE = "open", "picked_up", "completed"
_ID = re.compile(r"[0-9A-Z]{26}")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_TEXT = 8000


def new_id() -> str:
    return str(ULID())


def subject(handoff_id: str, actor: str) -> str:
    return f"{PREFIX}.{handoff_id}.{actor}"


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise CharterError(BAD_REQUEST, "a hand-off id is the 26-character id that `handoff` returned", "id")
    return value


def check_agent(value: Any, where: str = "to") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise CharterError(BAD_REQUEST, "name the next agent by its enrolled name (lowercase letters, digits, '-')", where)
    return value


def _items(value: Any, where: str) -> list[str]:
    """`done` and `pending` are lists of short statements; a single string is one item."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CharterError(BAD_REQUEST, f"{where} is a list of strings (or one string)", where)
    if sum(len(v) for v in value) > MAX_TEXT:
        raise CharterError(BAD_REQUEST, f"{where} is longer than {MAX_TEXT} characters", where)
    return [v.strip() for v in value if v.strip()]


def _text(value: Any, where: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise CharterError(BAD_REQUEST, f"{where} is a {'non-empty ' if required else ''}string", where)
    if len(value) > MAX_TEXT:
        raise CharterError(BAD_REQUEST, f"{where} is longer than {MAX_TEXT} characters", where)
    return value.strip()


def handoff_payload(args: dict[str, Any]) -> dict[str, Any]:
    context = args.get("context")
    if context is not None and not isinstance(context, dict):
        raise CharterError(BAD_REQUEST, "context is a JSON object", "context")
    return {
        "to": check_agent(args.get("to")),
        "title": _text(args.get("title"), "title", required=True)[:200],
        "done": _items(args.get("done"), "done"),
        "pending": _items(args.get("pending"), "pending"),
        "notes": _text(args.get("notes"), "notes"),
        "context": context or {},
    }


def pickup_payload(args: dict[str, Any]) -> dict[str, Any]:
    return {"note": _text(args.get("note"), "note")}


def complete_payload(args: dict[str, Any]) -> dict[str, Any]:
    result = args.get("result")
    if result is not None and not isinstance(result, dict):
        raise CharterError(BAD_REQUEST, "result is a JSON object", "result")
    return {"summary": _text(args.get("summary"), "summary", required=True), "done": _items(args.get("done"), "done"),
            "pending": _items(args.get("pending"), "pending"), "result": result or {}}


@dataclass
class Handoff:
    id: str
    author: str
    to: str
    title: str
    done: list[str]
    pending: list[str]
    notes: str
    context: dict[str, Any]
    created_at: int
    seq: int
    state: str = OPEN
    picked_up_by: str | None = None
    picked_up_at: int | None = None
    completed_at: int | None = None
    outcome: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "from": self.author, "to": self.to, "title": self.title,
                "done": self.done, "pending": self.pending, "notes": self.notes, "context": self.context,
                "created_at": _iso(self.created_at), "picked_up_by": self.picked_up_by,
                "picked_up_at": _iso(self.picked_up_at), "completed_at": _iso(self.completed_at),
                "outcome": self.outcome, "history": self.history}


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def fold(events: list[dict[str, Any]]) -> dict[str, Handoff]:
    """Hand-offs from their events (each `{seq, subject, kind, ts, payload}`), in log order."""
    out: dict[str, Handoff] = {}
    for ev in sorted(events, key=lambda e: e["seq"]):
        tokens = ev["subject"].split(".")
        if len(tokens) != 4 or ".".join(tokens[:2]) != PREFIX or not _ID.fullmatch(tokens[2]):
            continue
        hid, actor, kind, p = tokens[2], tokens[3], ev["kind"], ev["payload"]
        if not isinstance(p, dict):
            continue
        h = out.get(hid)
        step = {"step": kind, "by": actor, "at": _iso(ev["ts"]), "seq": ev["seq"]}
        if kind == HANDOFF and h is None:
            try:
                body = handoff_payload(p)
            except CharterError:
                continue
            out[hid] = Handoff(hid, actor, body["to"], body["title"], body["done"], body["pending"],
                               body["notes"], body["context"], ev["ts"], ev["seq"], history=[step])
        elif h is None:
            continue
        elif kind == PICKUP and h.state == OPEN and actor == h.to:
            h.state, h.picked_up_by, h.picked_up_at = PICKED, actor, ev["ts"]
            h.history.append({**step, "note": p.get("note", "")})
        elif kind == COMPLETE and h.state == PICKED and actor == h.picked_up_by:
            h.state, h.completed_at = DONE, ev["ts"]
            h.outcome = {k: p.get(k) for k in ("summary", "done", "pending", "result")}
            h.history.append(step)
    return out


def require(handoffs: dict[str, Handoff], hid: str) -> Handoff:
    h = handoffs.get(hid)
    if h is None:
        raise CharterError(NOT_FOUND, f"no hand-off {hid} in this agent's view (tasks.handoffs.>)", "id")
    return h


def check_pickup(h: Handoff, me: str) -> None:
    if h.to != me:
        raise CharterError(CONFLICT, f"hand-off {h.id} is for {h.to}, not {me}", "id")
    if h.state != OPEN:
        raise CharterError(CONFLICT, f"hand-off {h.id} is already {h.state.replace('_', ' ')}"
                           + (f" by {h.picked_up_by}" if h.picked_up_by else ""), "id")


def check_complete(h: Handoff, me: str) -> None:
    if h.state == DONE:
        raise CharterError(CONFLICT, f"hand-off {h.id} is already completed", "id")
    if h.state != PICKED or h.picked_up_by != me:
        raise CharterError(CONFLICT, f"hand-off {h.id} was not picked up by {me}; pick it up first", "id")

"""Approvals: risky actions wait here for the operator.

An approval is decided by a document signed with the operator's root key, checked here (not only
the HTTP request that carried it), so nothing but the root key can let a T3 action through. A
one-shot approval is claimed exactly once by the waiting agent; a window approval ("this agent,
this action, for 1 hour") lets the same action through until it ends. A pending request that nobody
decides expires into a denial.

Spending under an approval: a reservation for an action that needs one names the approval (or finds
a window that covers the agent and action). A one-shot approval pays for exactly one reservation:
`bind_reservation` records the reservation on it atomically, whether or not the agent claimed it
first with `wait_approval` (that claim and the reservation are the same single use). An approval
whose request named an `amount_usd` covers reservations up to that amount only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulid import ULID

from charter.db import connect
from charter.encoding import b64d, canonical
from charter.errors import BAD_REQUEST, BAD_SIGNATURE, CONFLICT, NOT_FOUND, CharterError
from charter.identity.keys import PublicKey, SigningKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    agent_name  TEXT NOT NULL,
    action      TEXT NOT NULL,
    attrs       TEXT NOT NULL,
    rule        TEXT,
    tier        TEXT,
    reason      TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'used')),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    decided_at  INTEGER,
    window_until INTEGER,
    decision    TEXT,
    used_at     INTEGER,
    reservation_id TEXT
);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals (state, expires_at);
CREATE INDEX IF NOT EXISTS approvals_window ON approvals (agent_id, action, window_until);
"""

PURPOSE = "charter.approval"
PENDING, APPROVED, DENIED, EXPIRED, USED = "pending", "approved", "denied", "expired", "used"
STATES = (PENDING, APPROVED, DENIED, EXPIRED, USED)


def _now() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Approval:
    id: str
    agent_id: str
    agent_name: str
    action: str
    attrs: dict[str, Any]
    rule: str | None
    tier: str | None
    reason: str
    state: str
    created_at: int
    expires_at: int
    decided_at: int | None
    window_until: int | None
    decision: dict[str, Any] | None
    used_at: int | None
    reservation_id: str | None = None  # the reservation a one-shot approval paid for

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "agent_id": self.agent_id, "agent_name": self.agent_name, "action": self.action,
            "attrs": self.attrs, "rule": self.rule, "tier": self.tier, "reason": self.reason, "state": self.state,
            "created_at": self.created_at, "expires_at": self.expires_at, "decided_at": self.decided_at,
            "window_until": self.window_until, "decision": self.decision, "used_at": self.used_at,
            "reservation_id": self.reservation_id,
        }


def _row(r: tuple) -> Approval:
    return Approval(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12],
                    json.loads(r[13]) if r[13] else None, r[14], r[15])


def decision_document(approval_id: str, verdict: str, window_s: float | None, note: str = "",
                      ts: int | None = None) -> dict[str, Any]:
    """The unsigned decision the operator signs."""
    return {"purpose": PURPOSE, "approval_id": approval_id, "verdict": verdict,
            "window_s": window_s, "note": note, "ts": _now() if ts is None else ts}


def sign_decision(key: SigningKey, doc: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in doc.items() if k != "sig"}
    return {**body, "sig": key.sign_b64(canonical(body))}


def verify_decision(root: PublicKey, doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("purpose") != PURPOSE:
        raise CharterError(BAD_REQUEST, "an approval decision is a signed charter.approval document", "decision")
    sig = doc.get("sig")
    body = {k: v for k, v in doc.items() if k != "sig"}
    try:
        ok = isinstance(sig, str) and root.verify(b64d(sig), canonical(body))
    except ValueError:
        ok = False
    if not ok:
        raise CharterError(BAD_SIGNATURE, "the decision is not signed by the operator's root key", "decision")
    if doc.get("verdict") not in ("approve", "deny"):
        raise CharterError(BAD_REQUEST, "verdict must be approve or deny", "verdict")
    w = doc.get("window_s")
    if w is not None and (not isinstance(w, (int, float)) or w <= 0 or w > 30 * 86400):
        raise CharterError(BAD_REQUEST, "window_s must be a number of seconds up to 30 days", "window_s")
    return doc


_COLS = ("id, agent_id, agent_name, action, attrs, rule, tier, reason, state, created_at, expires_at, "
         "decided_at, window_until, decision, used_at, reservation_id")


class Approvals:
    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._db = connect(path, synchronous=synchronous)
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(approvals)")}
        if "reservation_id" not in columns:  # a charter.db from before approvals could pay for reservations
            self._db.execute("ALTER TABLE approvals ADD COLUMN reservation_id TEXT")

    def close(self) -> None:
        self._db.close()

    def request(self, *, agent_id: str, agent_name: str, action: str, attrs: dict[str, Any], rule: str | None,
                tier: str | None, reason: str, ttl_s: float) -> Approval:
        now = _now()
        aid = f"apr_{ULID()}"
        self._db.execute(
            f"INSERT INTO approvals ({_COLS}) VALUES (?,?,?,?,?,?,?,?,'pending',?,?,NULL,NULL,NULL,NULL,NULL)",
            (aid, agent_id, agent_name, action, json.dumps(attrs, sort_keys=True), rule, tier, reason, now,
             now + int(ttl_s * 1000)),
        )
        return self.get(aid)

    def get(self, approval_id: str) -> Approval:
        r = self._db.execute(f"SELECT {_COLS} FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        if r is None:
            raise CharterError(NOT_FOUND, f"no approval {approval_id!r}", "approval")
        return _row(r)

    def list(self, state: str | None = None, limit: int = 200) -> list[Approval]:
        if state is not None and state not in STATES:
            raise CharterError(BAD_REQUEST, f"unknown approval state {state!r}: use one of {', '.join(STATES)}", "state")
        if state:
            rows = self._db.execute(f"SELECT {_COLS} FROM approvals WHERE state = ? ORDER BY created_at DESC LIMIT ?",
                                    (state, limit)).fetchall()
        else:
            rows = self._db.execute(f"SELECT {_COLS} FROM approvals ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def expire_due(self, now: int | None = None) -> list[Approval]:
        """Pending requests past their deadline become denials; returns them (for their events)."""
        now = _now() if now is None else now
        rows = self._db.execute(
            f"UPDATE approvals SET state = 'expired', decided_at = ? WHERE state = 'pending' AND expires_at <= ? "
            f"RETURNING {_COLS}", (now, now),
        ).fetchall()
        return [_row(r) for r in rows]

    def decide(self, doc: dict[str, Any], now: int | None = None) -> Approval:
        """Apply a verified decision document to a pending approval."""
        now = _now() if now is None else now
        self.expire_due(now)
        approval = self.get(doc["approval_id"])
        if approval.state != PENDING:
            raise CharterError(CONFLICT, f"approval {approval.id} is {approval.state}, not pending", "approval")
        state = APPROVED if doc["verdict"] == "approve" else DENIED
        window = now + int(doc["window_s"] * 1000) if state == APPROVED and doc.get("window_s") else None
        cur = self._db.execute(
            "UPDATE approvals SET state = ?, decided_at = ?, window_until = ?, decision = ? WHERE id = ? AND state = 'pending'",
            (state, now, window, json.dumps(doc), approval.id),
        )
        if cur.rowcount != 1:
            raise CharterError(CONFLICT, f"approval {approval.id} was decided meanwhile", "approval")
        return self.get(approval.id)

    def claim(self, approval_id: str, agent_id: str, now: int | None = None) -> Approval:
        """The waiting agent takes its one-shot approval: succeeds exactly once."""
        now = _now() if now is None else now
        approval = self.get(approval_id)
        if approval.agent_id != agent_id:
            raise CharterError(NOT_FOUND, f"no approval {approval_id!r} for this agent", "approval")
        if approval.window_until is not None:
            if now < approval.window_until:
                return approval
            raise CharterError(CONFLICT, "the approval window has ended", "approval")
        cur = self._db.execute(
            "UPDATE approvals SET state = 'used', used_at = ? WHERE id = ? AND state = 'approved'", (now, approval_id),
        )
        if cur.rowcount != 1:
            raise CharterError(CONFLICT, f"approval {approval_id} is {self.get(approval_id).state}; it cannot be used", "approval")
        return self.get(approval_id)

    def window_for(self, agent_id: str, action: str, now: int | None = None) -> Approval | None:
        """An approved window that covers this agent and action now, if any."""
        now = _now() if now is None else now
        r = self._db.execute(
            f"SELECT {_COLS} FROM approvals WHERE agent_id = ? AND action = ? AND state = 'approved' "
            f"AND window_until > ? ORDER BY window_until DESC LIMIT 1", (agent_id, action, now),
        ).fetchone()
        return _row(r) if r else None

    def for_spend(self, approval_id: str | None, *, agent_id: str, action: str, usd_micros: int,
                  now: int | None = None) -> Approval | None:
        """The approval that lets this agent reserve `usd_micros` for `action` now, if any.

        With an id: that approval, which must be this agent's, for this action, approved and not yet
        spent (a one-shot one may already be claimed by `wait_approval`, which is the same use), and
        must cover the amount. Without: a window that covers the agent and action. Raises CharterError
        naming what does not fit; None when no id is given and no window covers it.
        """
        now = _now() if now is None else now
        if approval_id is None:
            window = self.window_for(agent_id, action, now)
            if window is None or not _covers(window, usd_micros):
                return None
            return window
        a = self.get(approval_id)
        if a.agent_id != agent_id:
            raise CharterError(NOT_FOUND, f"no approval {approval_id!r} for this agent", "approval_id")
        if a.action != action:
            raise CharterError(CONFLICT, f"approval {a.id} is for {a.action!r}, not {action!r}", "approval_id")
        if not _covers(a, usd_micros):
            raise CharterError(CONFLICT, f"approval {a.id} covers at most ${a.attrs['amount_usd']:g}; this reservation "
                               f"asks ${usd_micros / 1e6:g}", "approval_id")
        if a.window_until is not None:
            if a.state == APPROVED and now < a.window_until:
                return a
            raise CharterError(CONFLICT, f"approval {a.id}'s window has ended", "approval_id")
        if a.reservation_id is not None:
            raise CharterError(CONFLICT, f"approval {a.id} already paid for reservation {a.reservation_id}", "approval_id")
        if a.state not in (APPROVED, USED):
            raise CharterError(CONFLICT, f"approval {a.id} is {a.state}; it cannot pay for a reservation", "approval_id")
        return a

    def bind_reservation(self, approval_id: str, reservation_id: str, now: int | None = None) -> Approval:
        """Spend a one-shot approval on one reservation: succeeds exactly once (a window is not spent)."""
        now = _now() if now is None else now
        cur = self._db.execute(
            "UPDATE approvals SET state = 'used', used_at = COALESCE(used_at, ?), reservation_id = ? "
            "WHERE id = ? AND window_until IS NULL AND reservation_id IS NULL AND state IN ('approved', 'used')",
            (now, reservation_id, approval_id),
        )
        if cur.rowcount != 1:
            a = self.get(approval_id)
            why = f"already paid for reservation {a.reservation_id}" if a.reservation_id else f"is {a.state}"
            raise CharterError(CONFLICT, f"approval {approval_id} {why}; it cannot pay for another", "approval_id")
        return self.get(approval_id)


def _covers(a: Approval, usd_micros: int) -> bool:
    """An approval whose request named `amount_usd` covers at most that much."""
    amount = a.attrs.get("amount_usd")
    if not isinstance(amount, (int, float)) or isinstance(amount, bool):
        return True
    return usd_micros <= round(float(amount) * 1_000_000)

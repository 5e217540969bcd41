"""Evaluate truths against the live state; remember contradictions, and say when each began and ended."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charter.bus.log.scan import read_matching
from charter.db import connect
from charter.encoding import loads
from charter.errors import BAD_REQUEST, NOT_FOUND, CharterError
from charter.identity.registry import OPERATOR_ID, REVOKED
from charter.policy.approvals import verify_decision
from charter.reflect.truths import BUILT_IN, Truth, user_truth

if TYPE_CHECKING:
    from charter.bus.log.base import LogEntry
    from charter.identity.keys import PublicKey
    from charter.node import Node

SCHEMA = """
CREATE TABLE IF NOT EXISTS contradictions (
    truth_id    TEXT NOT NULL,
    evidence    TEXT NOT NULL,
    severity    TEXT NOT NULL,
    since       REAL NOT NULL,
    resolved_at REAL,
    PRIMARY KEY (truth_id, evidence, since)
);
CREATE INDEX IF NOT EXISTS contradictions_open ON contradictions (resolved_at);
"""


@dataclass(frozen=True)
class Contradiction:
    truth: Truth
    evidence: str
    since: float

    def to_dict(self) -> dict[str, Any]:
        return {"truth": self.truth.id, "claim": self.truth.claim, "severity": self.truth.severity,
                "evidence": self.evidence, "since": self.since,
                "since_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.since)),
                "fix": self.truth.fix}


class Reflector:
    def __init__(self, db_path: Path, user_truths: list[dict[str, Any]] | None = None) -> None:
        self._db = connect(db_path)
        self._db.executescript(SCHEMA)
        self.truths: list[Truth] = list(BUILT_IN) + [
            user_truth(t, f"charter.toml: truths[{i}]") for i, t in enumerate(user_truths or [])]
        self.t3_audit = T3Audit(self._db)

    def close(self) -> None:
        self._db.close()

    def evaluate(self, state: dict[str, Any]) -> tuple[list[Contradiction], list[dict[str, Any]], list[dict[str, Any]]]:
        """(standing contradictions, newly raised, newly resolved). Remembered across runs."""
        now = time.time()
        found: dict[tuple[str, str], Truth] = {}
        for truth in self.truths:
            for evidence in truth.check(state):
                found[(truth.id, evidence)] = truth
        open_rows = {(r[0], r[1]): r[2] for r in self._db.execute(
            "SELECT truth_id, evidence, since FROM contradictions WHERE resolved_at IS NULL")}
        raised, resolved = [], []
        for key, truth in found.items():
            if key not in open_rows:
                self._db.execute("INSERT INTO contradictions VALUES (?,?,?,?,NULL)", (key[0], key[1], truth.severity, now))
                open_rows[key] = now
                raised.append({"truth": key[0], "evidence": key[1], "severity": truth.severity})
        for key, since in list(open_rows.items()):
            if key not in found:
                self._db.execute("UPDATE contradictions SET resolved_at = ? WHERE truth_id = ? AND evidence = ? AND since = ?",
                                 (now, key[0], key[1], since))
                resolved.append({"truth": key[0], "evidence": key[1], "since": since})
                del open_rows[key]
        standing = [Contradiction(found[k], k[1], open_rows[k]) for k in found]
        order = {"critical": 0, "warning": 1, "info": 2}
        standing.sort(key=lambda c: (order[c.truth.severity], c.truth.id, c.evidence))
        return standing, raised, resolved


async def reflect(node: Node) -> dict[str, Any]:
    """Check every truth now; publish what changed; return the standing contradictions."""
    from charter.capsules.state import live_state

    state = await live_state(node, events=0)
    state["_unapproved_t3"] = await node.reflector.t3_audit.scan(node)
    active = [a for a in node.registry.all() if a.status == "active"]
    state["_sandbox_exists"] = {a.id: Path(a.charter.get("sandbox", {}).get("path", "/nonexistent")).is_dir()
                                for a in active}
    state["_policy_known"] = {a.id: node.gov.bound_policy(a) is not None for a in active}
    capsules = getattr(node, "capsules", None)
    state["capsule"] = capsules.freshness() if capsules else {}
    standing, raised, resolved = node.reflector.evaluate(state)
    for r in raised:
        await node.emit("charter.reflect.contradiction", r)
    for r in resolved:
        await node.emit("charter.reflect.resolved", r)
    critical = [c for c in standing if c.truth.severity == "critical"]
    return {"ok": not standing, "critical": len(critical), "contradictions": [c.to_dict() for c in standing],
            "truths": [{"id": t.id, "claim": t.claim, "severity": t.severity, "source": t.source}
                       for t in node.reflector.truths],
            "checked_at": time.time()}


ACK_SUBJECT = "charter.reflect.acknowledged"
T3_TRUTH = "t3-approved"

T3_SCHEMA = """
CREATE TABLE IF NOT EXISTS reflect_t3_cursor (
    id     INTEGER PRIMARY KEY CHECK (id = 0),
    seq    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reflect_t3_grants (
    approval_id  TEXT PRIMARY KEY,
    seq          INTEGER NOT NULL,
    verdict      TEXT NOT NULL,
    agent_id     TEXT,
    action       TEXT,
    window_until INTEGER
);
CREATE TABLE IF NOT EXISTS reflect_t3_findings (
    seq         INTEGER PRIMARY KEY,
    agent_id    TEXT,
    agent       TEXT,
    action      TEXT,
    approval_id TEXT,
    why         TEXT NOT NULL,
    ack_seq     INTEGER,
    ack_note    TEXT
);
"""


class T3Audit:
    """Every T3 action that ran, judged against the approvals the operator had granted before it.

    What counts as "ran", on the bus (both are the operator's own events, see `governance.py`):
    an `allow` T3 decision on `charter.decisions.*` (an approval window letting the action through),
    and a `used` T3 approval on `charter.approvals.*` (the waiting agent claiming its one-shot
    approval). A `used` event that marks a window's use is skipped: its `allow` decision is judged.

    A run is valid only if the approval it cites was granted before it in the log: a `charter.approvals.*`
    event in state `approved` carrying a decision signed by the root key with the verdict `approve`,
    for the same agent and action, and (a window) with the run inside the window.

    The verdict on each run is final, taken with what preceded it in the log: an approval granted
    afterwards does not launder it. A finding stands until the operator answers it with an event:
    an acknowledgement (`charter.reflect.acknowledged` {truth, seq, note}, signed by the root key,
    naming a finding already standing) or the revocation of the agent that ran it.

    Incremental and durable: the cursor, the grants seen and the findings are kept in SQLite, so a
    long log costs nothing extra, a restart does not rescan, and retention cannot erase a finding.
    """

    PATTERNS = ("charter.decisions.>", "charter.approvals.>", ACK_SUBJECT)
    BATCH = 2000

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(T3_SCHEMA)
        self._lock = asyncio.Lock()

    @property
    def cursor(self) -> int:
        row = self._db.execute("SELECT seq FROM reflect_t3_cursor WHERE id = 0").fetchone()
        return int(row[0]) if row else 0

    async def scan(self, node: Node) -> list[dict[str, Any]]:
        """Judge what was appended since the last scan; return the findings still standing."""
        async with self._lock:  # reflect() may run for the API and the capsule builder at once
            head = (await node.log.head())[0]
            cursor = self.cursor
            if head < cursor:  # a different log (reset, another backend): its seqs name other entries
                self._db.execute("DELETE FROM reflect_t3_grants")
                cursor = 0
            while cursor < head:
                batch = await read_matching(node.log, self.PATTERNS, after=cursor, upto=head, limit=self.BATCH,
                                            sender=OPERATOR_ID)
                cursor = batch[-1].seq if len(batch) == self.BATCH else head
                self._judge(batch, node.root_key.public, cursor)  # no await inside: one transaction
        return self.standing(node)

    def standing(self, node: Node) -> list[dict[str, Any]]:
        """Findings neither acknowledged nor retired with their agent."""
        out = []
        for seq, agent_id, agent, action, approval_id, why in self._db.execute(
                "SELECT seq, agent_id, agent, action, approval_id, why FROM reflect_t3_findings "
                "WHERE ack_seq IS NULL ORDER BY seq"):
            record = node.registry.get(agent_id) if agent_id else None
            if record is not None and record.status == REVOKED:
                continue
            out.append({"seq": seq, "agent_id": agent_id, "agent": agent, "action": action,
                        "approval_id": approval_id, "why": why})
        return out

    def _judge(self, batch: list[LogEntry], root: PublicKey, cursor: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for e in batch:
                env = loads(e.raw)
                p = env.get("payload")
                if not isinstance(p, dict):
                    continue
                if e.subject == ACK_SUBJECT:
                    self._acknowledge(e.seq, p)
                elif e.subject.startswith("charter.approvals."):
                    self._approval_event(e, env, p, root)
                elif p.get("tier") == "T3" and p.get("effect") == "allow":
                    self._run(e, env, p)
            db.execute("INSERT INTO reflect_t3_cursor (id, seq) VALUES (0, ?) "
                       "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq", (cursor,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _approval_event(self, e: LogEntry, env: dict[str, Any], p: dict[str, Any], root: PublicKey) -> None:
        aid, state = p.get("approval_id"), p.get("state")
        if not isinstance(aid, str):
            return
        if state in ("approved", "denied", "expired"):
            verdict = {"approved": "approve", "denied": "deny", "expired": "expired"}[state]
            if state == "approved" and not _signed_approval(root, p.get("decision"), aid):
                verdict = "unsigned"
            # An approval is decided once: a second "decision" for the same id changes nothing.
            self._db.execute("INSERT OR IGNORE INTO reflect_t3_grants VALUES (?,?,?,?,?,?)",
                             (aid, e.seq, verdict, p.get("agent_id"), p.get("action"), p.get("window_until")))
        elif state == "used" and p.get("tier") == "T3" and not p.get("window"):
            self._run(e, env, p)

    def _run(self, e: LogEntry, env: dict[str, Any], p: dict[str, Any]) -> None:
        agent_id, action, aid = p.get("agent_id"), p.get("action"), p.get("approval_id")
        if agent_id == OPERATOR_ID:
            return  # the operator acts with the root key, the key that grants approvals
        why = self._why_invalid(e.seq, int(env.get("ts") or 0), agent_id, action, aid)
        if why is not None:
            agent = e.subject.split(".", 2)[2] if e.subject.count(".") >= 2 else str(agent_id)
            self._db.execute("INSERT OR IGNORE INTO reflect_t3_findings VALUES (?,?,?,?,?,?,NULL,NULL)",
                             (e.seq, agent_id, agent, action, aid, why))

    def _why_invalid(self, seq: int, ts: int, agent_id: Any, action: Any, aid: Any) -> str | None:
        """None if the cited approval was granted before `seq` and covers this run; else why not.

        How often a one-shot approval is used is the approvals store's to enforce (a claim and the
        reservation it pays for are one use), so it is not counted here.
        """
        if not isinstance(aid, str) or not aid:
            return "it cites no approval"
        g = self._db.execute("SELECT verdict, agent_id, action, window_until FROM reflect_t3_grants "
                             "WHERE approval_id = ? AND seq < ?", (aid, seq)).fetchone()
        if g is None:
            return f"approval {aid} was not granted before it ran"
        verdict, g_agent, g_action, window_until = g
        if verdict != "approve":
            return {"deny": f"the operator denied approval {aid}",
                    "expired": f"approval {aid} expired undecided",
                    }.get(verdict, f"approval {aid} was not granted by a decision signed with the root key")
        if g_agent != agent_id:
            return f"approval {aid} was granted to another agent"
        if g_action != action:
            return f"approval {aid} was granted for {g_action}, not {action}"
        if window_until is not None and ts >= int(window_until):
            return f"approval {aid}'s window had ended"
        return None

    def _acknowledge(self, seq: int, p: dict[str, Any]) -> None:
        """Only a finding already standing, named by seq, with a reason: never one in advance."""
        target, note = p.get("seq"), p.get("note")
        if p.get("truth") != T3_TRUTH or type(target) is not int or not isinstance(note, str) or not note.strip():
            return
        self._db.execute("UPDATE reflect_t3_findings SET ack_seq = ?, ack_note = ? "
                         "WHERE seq = ? AND seq < ? AND ack_seq IS NULL", (seq, note.strip(), target, seq))


def _signed_approval(root: PublicKey, doc: Any, approval_id: str) -> bool:
    try:
        doc = verify_decision(root, doc)
    except CharterError:
        return False
    return doc.get("approval_id") == approval_id and doc.get("verdict") == "approve"


async def acknowledge(node: Node, seq: int, note: str) -> dict[str, Any]:
    """The operator answers an unapproved T3 action it has looked into: an event, signed by the root key.

    A later approval cannot clear such a finding (the action had already run), so this is how an
    expected one is closed; an unexpected one is closed by revoking the agent. The note says why,
    and stays in the log.
    """
    if not isinstance(note, str) or not note.strip():
        raise CharterError(BAD_REQUEST, "say why the action is acknowledged: the note stays in the log", "note")
    standing = await node.reflector.t3_audit.scan(node)
    if not any(f["seq"] == seq for f in standing):
        raise CharterError(NOT_FOUND, f"no standing {T3_TRUTH} contradiction at seq {seq}", "seq")
    receipt = await node.emit(ACK_SUBJECT, {"truth": T3_TRUTH, "seq": seq, "note": note.strip()})
    await node.reflector.t3_audit.scan(node)
    return {"acknowledged": seq, "event_seq": receipt.seq}

"""Evaluate truths against the live state; remember contradictions, and say when each began and ended."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charter.bus.log.scan import read_matching
from charter.db import connect
from charter.identity.registry import OPERATOR_ID
from charter.reflect.truths import BUILT_IN, Truth, user_truth

if TYPE_CHECKING:
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
        self.t3_audit = T3Audit()

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
    state["_sandbox_exists"] = {a.id: Path(a.charter.get("sandbox", {}).get("path", "/nonexistent")).is_dir()
                                for a in node.registry.all() if a.status == "active"}
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


class T3Audit:
    """T3 allow decisions in the log without an approval the operator decided.

    Incremental: each run reads only the decisions appended since the last one (filtered by the
    log, see `bus.log.scan`), so a long log costs nothing extra. A decision whose approval does not
    check out yet is kept and checked again on every run.
    """

    def __init__(self) -> None:
        self.cursor = 0
        self.suspects: dict[int, dict[str, Any]] = {}

    async def scan(self, node: Node) -> list[dict[str, Any]]:
        from charter.encoding import loads

        head = (await node.log.head())[0]
        while self.cursor < head:
            batch = await read_matching(node.log, ("charter.decisions.>",), after=self.cursor, upto=head, limit=2000,
                                        sender=OPERATOR_ID)
            for e in batch:
                p = loads(e.raw)["payload"]
                if p.get("tier") == "T3" and p.get("effect") == "allow":
                    self.suspects[e.seq] = p
            self.cursor = batch[-1].seq if len(batch) == 2000 else head
        out = []
        for seq, p in list(self.suspects.items()):
            if self._approved(node, p.get("approval_id")):
                del self.suspects[seq]
            else:
                out.append({"seq": seq, "action": p.get("action"), "agent": p.get("agent_id")})
        for a in node.gov.approvals.list("used", limit=10_000) + node.gov.approvals.list("approved", limit=10_000):
            if a.tier == "T3" and not a.decision:
                out.append({"seq": 0, "action": a.action, "agent": a.agent_name})
        return out

    @staticmethod
    def _approved(node: Node, approval_id: str | None) -> bool:
        if not approval_id:
            return False
        try:
            a = node.gov.approvals.get(approval_id)
        except Exception:  # noqa: BLE001 - an unknown approval is no approval
            return False
        return a.decision is not None and a.state in ("used", "approved")

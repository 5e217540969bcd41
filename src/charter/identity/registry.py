"""The agent registry and the invites, kept in SQLite.

Invites are redeemed and the agent inserted in one IMMEDIATE transaction, so a single-use token
can never enrol two agents, however many requests race for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charter.bus.subjects import SubjectSet
from charter.db import connect
from charter.encoding import canonical, loads
from charter.errors import BAD_TOKEN, CONFLICT, NOT_FOUND, CharterError
from charter.identity.keys import PublicKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS invites (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    uses        INTEGER NOT NULL,
    uses_left   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0,
    note        TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    reason      TEXT NOT NULL DEFAULT '',
    charter     BLOB NOT NULL,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    invite_id   TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_name ON agents (name);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0
);
"""

OPERATOR_ID = "operator"
ACTIVE, SUSPENDED, REVOKED = "active", "suspended", "revoked"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Invite:
    id: str
    role: str
    uses: int
    uses_left: int
    created_at: int
    expires_at: int
    revoked: bool
    note: str

    def state(self, now: int | None = None) -> str:
        if self.revoked:
            return "revoked"
        if self.uses_left <= 0:
            return "used"
        if (now or now_ms()) >= self.expires_at:
            return "expired"
        return "open"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "role": self.role, "uses": self.uses, "uses_left": self.uses_left,
            "created_at": self.created_at, "expires_at": self.expires_at, "state": self.state(),
            "note": self.note,
        }


@dataclass(slots=True)
class AgentRecord:
    """An agent as the gate sees it; the scope sets memoise their answers."""

    id: str
    name: str
    role: str
    public_key: PublicKey
    status: str
    reason: str
    charter: dict[str, Any]
    issued_at: int
    expires_at: int
    created_at: int = 0
    publish: SubjectSet = field(init=False)
    subscribe: SubjectSet = field(init=False)

    def __post_init__(self) -> None:
        scopes = self.charter.get("scopes", {})
        self.publish = SubjectSet(scopes.get("publish", []))
        self.subscribe = SubjectSet(scopes.get("subscribe", []))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "role": self.role, "status": self.status,
            "reason": self.reason, "public_key": self.public_key.b64, "key_id": self.public_key.key_id,
            "issued_at": self.issued_at, "expires_at": self.expires_at, "created_at": self.created_at,
            "scopes": self.charter.get("scopes", {}), "policy": self.charter.get("policy", {}),
            "max_tier": self.charter.get("max_tier"), "budget": self.charter.get("budget", {}),
            "sandbox": self.charter.get("sandbox", {}),
        }


def _record(row: tuple) -> AgentRecord:
    return AgentRecord(
        id=row[0], name=row[1], role=row[2], public_key=PublicKey.from_b64(row[3]), status=row[4],
        reason=row[5], charter=loads(row[6]), issued_at=row[7], expires_at=row[8], created_at=row[9],
    )


_AGENT_COLS = "id, name, role, public_key, status, reason, charter, issued_at, expires_at, created_at"


def agent_row(rec: AgentRecord, invite_id: str | None, now: int) -> tuple:
    """The `agents` row of a record, in column order (SQLite and PostgreSQL alike)."""
    return (rec.id, rec.name, rec.role, rec.public_key.b64, rec.status, rec.reason, canonical(rec.charter),
            rec.issued_at, rec.expires_at, invite_id, now, now)


def _insert_agent(db: Any, rec: AgentRecord, invite_id: str | None, now: int) -> None:
    db.execute("INSERT INTO agents VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", agent_row(rec, invite_id, now))


class CachedRegistry:
    """What every registry serves from memory: the gate looks an agent up on every message."""

    _agents: dict[str, AgentRecord]
    _keys: dict[str, str]

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def children(self, agent_id: str) -> list[AgentRecord]:
        """The sub-agents whose charter names `agent_id` as their parent."""
        return [a for a in self.all() if (a.charter.get("parent") or {}).get("agent_id") == agent_id]

    def find(self, ref: str) -> AgentRecord:
        """An agent by id, or by name (the live one if a revoked agent shares the name)."""
        rec = self._agents.get(ref)
        if rec:
            return rec
        named = sorted((a for a in self._agents.values() if a.name == ref), key=lambda a: a.created_at)
        if not named:
            raise CharterError(NOT_FOUND, f"no agent with id or name {ref!r}", "agent")
        # The live one; the newest if a shared registry has not yet heard that an older one was revoked.
        live = [a for a in named if a.status != REVOKED]
        return (live or named)[-1]

    def all(self) -> list[AgentRecord]:
        return sorted(self._agents.values(), key=lambda a: (a.created_at, a.id))

    def agent_for_key(self, key_hash: str) -> AgentRecord | None:
        agent_id = self._keys.get(key_hash)
        return self._agents.get(agent_id) if agent_id else None


def check_invite(row: tuple | None, expected_role: str | None, now: int) -> tuple[str, str]:
    """(invite id, role) of a redeemable invite row `(id, role, uses_left, expires_at, revoked)`, or why not."""
    if row is None:
        raise CharterError(BAD_TOKEN, "unknown invite token", "token")
    invite_id, role, uses_left, expires_at, revoked = row
    if revoked:
        raise CharterError(BAD_TOKEN, "this invite was revoked", "token")
    if now >= expires_at:
        raise CharterError(BAD_TOKEN, "this invite has expired; ask the operator for a new one", "token")
    if uses_left <= 0:
        raise CharterError(BAD_TOKEN, "this invite has already been used", "token")
    if expected_role is not None and expected_role != role:
        raise CharterError(BAD_TOKEN, f"this invite is for role {role!r}, not {expected_role!r}", "role")
    return invite_id, role


def name_taken(name: str) -> CharterError:
    return CharterError(CONFLICT, f"an agent named {name!r} is already enrolled", "name")


class Registry(CachedRegistry):
    """Agents and invites. Reads of agents are served from memory; every write goes to SQLite first."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._db = connect(path, synchronous=synchronous)
        self._db.executescript(SCHEMA)
        self._agents: dict[str, AgentRecord] = {}
        self._keys: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        rows = self._db.execute(f"SELECT {_AGENT_COLS} FROM agents").fetchall()
        self._agents = {r[0]: _record(r) for r in rows}
        self._keys = dict(self._db.execute("SELECT key_hash, agent_id FROM api_keys WHERE revoked = 0").fetchall())

    # -- invites ---------------------------------------------------------------------------

    def add_invite(self, inv: Invite, token_hash: str) -> None:
        self._db.execute(
            "INSERT INTO invites VALUES (?,?,?,?,?,?,?,?,?)",
            (inv.id, token_hash, inv.role, inv.uses, inv.uses_left, inv.created_at, inv.expires_at,
             int(inv.revoked), inv.note),
        )

    def invites(self) -> list[Invite]:
        rows = self._db.execute(
            "SELECT id, role, uses, uses_left, created_at, expires_at, revoked, note FROM invites ORDER BY created_at"
        ).fetchall()
        return [Invite(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows]

    def revoke_invite(self, invite_id: str) -> None:
        cur = self._db.execute("UPDATE invites SET revoked = 1 WHERE id = ?", (invite_id,))
        if cur.rowcount == 0:
            raise CharterError(NOT_FOUND, f"no invite with id {invite_id!r}", "invite")

    def redeem(
        self,
        token_hash: str,
        *,
        name: str,
        expected_role: str | None,
        build: Callable[[str], AgentRecord],
    ) -> AgentRecord:
        """Spend one use of the invite and insert the agent `build(role)` returns, atomically."""
        db = self._db
        now = now_ms()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT id, role, uses_left, expires_at, revoked FROM invites WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            invite_id, role = check_invite(row, expected_role, now)
            taken = db.execute(
                "SELECT id FROM agents WHERE name = ? AND status != 'revoked'", (name,)
            ).fetchone()
            if taken:
                raise name_taken(name)
            rec = build(role)
            db.execute("UPDATE invites SET uses_left = uses_left - 1 WHERE id = ?", (invite_id,))
            _insert_agent(db, rec, invite_id, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        rec.created_at = now
        self._agents[rec.id] = rec
        return rec

    # -- agents ----------------------------------------------------------------------------

    def insert(self, rec: AgentRecord) -> AgentRecord:
        """Insert an agent enrolled without an invite (a sub-agent); names stay unique among live agents."""
        db = self._db
        now = now_ms()
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT id FROM agents WHERE name = ? AND status != 'revoked'", (rec.name,)).fetchone():
                raise name_taken(rec.name)
            _insert_agent(db, rec, None, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        rec.created_at = now
        self._agents[rec.id] = rec
        return rec

    def set_status(self, agent_id: str, status: str, reason: str = "") -> AgentRecord:
        rec = self._agents[agent_id]
        self._db.execute(
            "UPDATE agents SET status = ?, reason = ?, updated_at = ? WHERE id = ?",
            (status, reason, now_ms(), agent_id),
        )
        rec.status, rec.reason = status, reason
        return rec

    def replace_charter(self, rec: AgentRecord, charter: dict[str, Any], public_key: PublicKey) -> AgentRecord:
        """Store a renewed or re-keyed charter; the new record replaces the old one atomically."""
        new = AgentRecord(
            id=rec.id, name=rec.name, role=rec.role, public_key=public_key, status=rec.status,
            reason=rec.reason, charter=charter, issued_at=charter["issued_at"],
            expires_at=charter["expires_at"], created_at=rec.created_at,
        )
        self._db.execute(
            "UPDATE agents SET public_key = ?, charter = ?, issued_at = ?, expires_at = ?, updated_at = ? WHERE id = ?",
            (public_key.b64, canonical(charter), new.issued_at, new.expires_at, now_ms(), rec.id),
        )
        self._agents[rec.id] = new
        return new

    # -- bearer keys (for unmodified OpenAI and Ollama clients) ----------------------------

    def add_api_key(self, agent_id: str, key_hash: str, *, replace: bool = True) -> None:
        """Bind a new bearer key (stored as a hash) to an agent; by default the old ones stop working."""
        if replace:
            self._db.execute("UPDATE api_keys SET revoked = 1 WHERE agent_id = ?", (agent_id,))
            self._keys = {h: a for h, a in self._keys.items() if a != agent_id}
        self._db.execute("INSERT INTO api_keys VALUES (?,?,?,0)", (key_hash, agent_id, now_ms()))
        self._keys[key_hash] = agent_id

    def close(self) -> None:
        self._db.close()

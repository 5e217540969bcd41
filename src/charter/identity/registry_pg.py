"""The agent registry, the invites and the bearer keys on PostgreSQL (`[store] backend = "postgres"`).

Several daemons of one installation share it. Reads are served from memory, as with SQLite; every
write commits to PostgreSQL first and sends a `NOTIFY charter_registry` in the same transaction.
Each daemon LISTENs on its own connection (a thread) and re-reads what changed, so an agent revoked
or suspended on one daemon is refused by every other one within milliseconds of the COMMIT
(tests/jetstream/test_two_daemons.py holds it to one second). After a lost listener connection the
thread reconnects with backoff and re-reads everything, since notifications sent meanwhile are gone.

An agent enrolled on one daemon can call another before that one's notification arrives: its id, or
its bearer key, is not in memory yet. A miss is therefore asked of PostgreSQL once, on a connection
of its own, before the caller refuses it as unknown. It is a primary-key read (a fraction of a
millisecond on the same host), made on the caller's thread, the event loop included, and bounded:
an id or key PostgreSQL does not know is not asked again for `MISS_TTL`; at most `MISS_READS_PER_S`
misses are asked per second, and the rest are refused at once; the reads have a statement timeout,
and after a failed one the connection is rebuilt in a thread while misses are refused meanwhile
(fail closed). A flood of made-up ids therefore costs PostgreSQL a few reads a second, not one each.

Redeeming an invite locks the invite's row (`FOR UPDATE`), so a single-use token enrols one agent
however many daemons race for it; a partial unique index keeps live names unique across daemons.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from charter.encoding import canonical
from charter.errors import NOT_FOUND, CharterError
from charter.identity.keys import PublicKey
from charter.identity.registry import (
    _AGENT_COLS,
    AgentRecord,
    CachedRegistry,
    Invite,
    _record,
    agent_row,
    check_invite,
    name_taken,
    now_ms,
)

log = logging.getLogger("charter.registry")

CHANNEL = "charter_registry"  # + the schema: installations sharing a database do not hear each other
RESYNC_EVERY = 60.0  # a full re-read now and then, whatever the notifications said
MISS_TTL = 1.0  # seconds an id or key PostgreSQL did not know is refused without asking it again
MISS_READS_PER_S = 20  # misses asked of PostgreSQL per second at most; beyond, refused at once
MISS_TIMEOUT_MS = 250  # a miss's read gives up after this (the caller may be the event loop)
MISS_RECONNECT_S = 2.0  # pause between attempts to rebuild the misses' connection
MAX_UNKNOWN = 1024  # remembered unknown ids and keys before the expired ones are dropped

SCHEMA = """
CREATE TABLE IF NOT EXISTS invites (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    uses        INTEGER NOT NULL,
    uses_left   INTEGER NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
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
    charter     BYTEA NOT NULL,
    issued_at   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    invite_id   TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS agents_live_name ON agents (name) WHERE status != 'revoked';
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0
);
"""

_INSERT_AGENT = "INSERT INTO agents VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"


class PgRegistry(CachedRegistry):
    """`Registry` on PostgreSQL, kept in step across daemons by LISTEN/NOTIFY."""

    def __init__(self, dsn: str, *, listen: bool = True) -> None:
        self.dsn = dsn
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._lock = threading.Lock()  # one writer connection, shared by the loop and worker threads
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('charter_registry_schema'))")
            self._conn.execute(SCHEMA)
            schema = self._conn.execute("SELECT current_schema()").fetchone()[0] or "public"
        self.channel = f"{CHANNEL}_{''.join(c if c.isalnum() else '_' for c in schema)}"[:63]
        self._agents: dict[str, AgentRecord] = {}
        self._keys: dict[str, str] = {}
        self.reload()
        self._misses = MissReader(dsn)
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while the listener is connected and LISTENing
        self._listener: threading.Thread | None = None
        if listen:
            self._listener = threading.Thread(target=self._listen_forever, name="charter-registry-listen", daemon=True)
            self._listener.start()

    # -- keeping the cache true --------------------------------------------------------------

    def reload(self) -> None:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_AGENT_COLS} FROM agents").fetchall()
            keys = self._conn.execute("SELECT key_hash, agent_id FROM api_keys WHERE revoked = 0").fetchall()
        fresh = {r[0]: _record(_plain(r)) for r in rows}
        for agent_id, rec in fresh.items():
            self._merge(rec)
        for gone in set(self._agents) - set(fresh):
            self._agents.pop(gone, None)
        self._keys = dict(keys)

    def _reload_agent(self, agent_id: str) -> None:
        # On the writer connection: the listener's own is locked by its `notifies()` generator.
        with self._lock:
            row = self._conn.execute(f"SELECT {_AGENT_COLS} FROM agents WHERE id = %s", (agent_id,)).fetchone()
            keys = self._conn.execute("SELECT key_hash, agent_id FROM api_keys WHERE revoked = 0").fetchall()
        if row is None:
            self._agents.pop(agent_id, None)
        else:
            self._merge(_record(_plain(row)))
        self._keys = dict(keys)

    def _merge(self, rec: AgentRecord) -> None:
        """Update in place when only the status moved (holders of the record see it), else replace."""
        have = self._agents.get(rec.id)
        if have is not None and have.charter == rec.charter and have.public_key.b64 == rec.public_key.b64:
            have.status, have.reason = rec.status, rec.reason
        else:
            self._agents[rec.id] = rec

    def _listen_forever(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.reload()  # whatever changed while nobody listened
                    self.listening.set()
                    backoff = 0.1
                    last_sync = time.monotonic()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            kind, _, agent_id = note.payload.partition(":")
                            if kind == "agent" and agent_id:
                                self._reload_agent(agent_id)
                            else:
                                self.reload()
                        if time.monotonic() - last_sync > RESYNC_EVERY:
                            self.reload()
                            last_sync = time.monotonic()
            except psycopg.Error as exc:
                self.listening.clear()
                if self._stop.is_set():
                    return
                log.warning("registry listener lost PostgreSQL (%s); reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.listening.clear()

    def _notify(self, conn: psycopg.Connection, what: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, what))

    # -- what is not in memory yet -------------------------------------------------------------

    def get(self, agent_id: str) -> AgentRecord | None:
        rec = self._agents.get(agent_id)
        if rec is None and agent_id:
            row = self._misses.read(agent_id, f"SELECT {_AGENT_COLS} FROM agents WHERE id = %s")
            if row is not None:
                rec = self._learn(row)
        return rec

    def agent_for_key(self, key_hash: str) -> AgentRecord | None:
        agent_id = self._keys.get(key_hash)
        if agent_id is not None:
            return self.get(agent_id)
        cols = ", ".join(f"a.{c.strip()}" for c in _AGENT_COLS.split(","))
        row = self._misses.read(key_hash, f"SELECT {cols} FROM api_keys k JOIN agents a ON a.id = k.agent_id "
                                          "WHERE k.key_hash = %s AND k.revoked = 0")
        if row is None:
            return None
        rec = self._learn(row)
        keys = dict(self._keys)
        keys[key_hash] = rec.id
        self._keys = keys
        return rec

    def find(self, ref: str) -> AgentRecord:
        try:
            return super().find(ref)
        except CharterError as exc:
            if exc.code != NOT_FOUND:
                raise
            row = self._misses.read(f"name:{ref}", f"SELECT {_AGENT_COLS} FROM agents WHERE id = %s OR name = %s "
                                                   "ORDER BY status = 'revoked', created_at DESC LIMIT 1", ref, ref)
            if row is None:
                raise
            return self._learn(row)

    def _learn(self, row: tuple) -> AgentRecord:
        self._merge(_record(_plain(row)))
        return self._agents[row[0]]

    @property
    def miss_reads(self) -> int:
        """How many misses were asked of PostgreSQL (for tests and the curious)."""
        return self._misses.reads

    # -- invites -----------------------------------------------------------------------------

    def add_invite(self, inv: Invite, token_hash: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO invites VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (inv.id, token_hash, inv.role, inv.uses, inv.uses_left, inv.created_at, inv.expires_at,
                 int(inv.revoked), inv.note))

    def invites(self) -> list[Invite]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, role, uses, uses_left, created_at, expires_at, revoked, note FROM invites "
                "ORDER BY created_at, id").fetchall()
        return [Invite(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows]

    def revoke_invite(self, invite_id: str) -> None:
        with self._lock:
            cur = self._conn.execute("UPDATE invites SET revoked = 1 WHERE id = %s", (invite_id,))
        if cur.rowcount == 0:
            raise CharterError(NOT_FOUND, f"no invite with id {invite_id!r}", "invite")

    def redeem(self, token_hash: str, *, name: str, expected_role: str | None,
               build: Callable[[str], AgentRecord]) -> AgentRecord:
        """Spend one use of the invite and insert the agent `build(role)` returns, atomically."""
        now = now_ms()
        with self._lock:
            try:
                with self._conn.transaction():
                    row = self._conn.execute(
                        "SELECT id, role, uses_left, expires_at, revoked FROM invites WHERE token_hash = %s FOR UPDATE",
                        (token_hash,)).fetchone()
                    invite_id, role = check_invite(row, expected_role, now)
                    if self._conn.execute("SELECT 1 FROM agents WHERE name = %s AND status != 'revoked'",
                                          (name,)).fetchone():
                        raise name_taken(name)
                    rec = build(role)
                    self._conn.execute("UPDATE invites SET uses_left = uses_left - 1 WHERE id = %s", (invite_id,))
                    self._conn.execute(_INSERT_AGENT, agent_row(rec, invite_id, now))
                    self._notify(self._conn, f"agent:{rec.id}")
            except psycopg.errors.UniqueViolation:
                raise name_taken(name) from None
        rec.created_at = now
        self._agents[rec.id] = rec
        return rec

    # -- agents ------------------------------------------------------------------------------

    def insert(self, rec: AgentRecord) -> AgentRecord:
        """Insert an agent enrolled without an invite (a sub-agent); names stay unique among live agents."""
        now = now_ms()
        with self._lock:
            try:
                with self._conn.transaction():
                    self._conn.execute(_INSERT_AGENT, agent_row(rec, None, now))
                    self._notify(self._conn, f"agent:{rec.id}")
            except psycopg.errors.UniqueViolation:
                raise name_taken(rec.name) from None
        rec.created_at = now
        self._agents[rec.id] = rec
        return rec

    def set_status(self, agent_id: str, status: str, reason: str = "") -> AgentRecord:
        rec = self._agents[agent_id]
        with self._lock, self._conn.transaction():
            self._conn.execute("UPDATE agents SET status = %s, reason = %s, updated_at = %s WHERE id = %s",
                               (status, reason, now_ms(), agent_id))
            self._notify(self._conn, f"agent:{agent_id}")
        rec.status, rec.reason = status, reason
        return rec

    def replace_charter(self, rec: AgentRecord, charter: dict[str, Any], public_key: PublicKey) -> AgentRecord:
        """Store a renewed or re-keyed charter; the new record replaces the old one atomically."""
        new = AgentRecord(id=rec.id, name=rec.name, role=rec.role, public_key=public_key, status=rec.status,
                          reason=rec.reason, charter=charter, issued_at=charter["issued_at"],
                          expires_at=charter["expires_at"], created_at=rec.created_at)
        with self._lock, self._conn.transaction():
            self._conn.execute(
                "UPDATE agents SET public_key = %s, charter = %s, issued_at = %s, expires_at = %s, updated_at = %s "
                "WHERE id = %s", (public_key.b64, canonical(charter), new.issued_at, new.expires_at, now_ms(), rec.id))
            self._notify(self._conn, f"agent:{rec.id}")
        self._agents[rec.id] = new
        return new

    # -- bearer keys -------------------------------------------------------------------------

    def add_api_key(self, agent_id: str, key_hash: str, *, replace: bool = True) -> None:
        """Bind a new bearer key (stored as a hash) to an agent; by default the old ones stop working."""
        with self._lock, self._conn.transaction():
            if replace:
                self._conn.execute("UPDATE api_keys SET revoked = 1 WHERE agent_id = %s", (agent_id,))
            self._conn.execute("INSERT INTO api_keys VALUES (%s,%s,%s,0)", (key_hash, agent_id, now_ms()))
            self._notify(self._conn, f"agent:{agent_id}")
        keys = {h: a for h, a in self._keys.items() if a != agent_id} if replace else dict(self._keys)
        keys[key_hash] = agent_id
        self._keys = keys

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
        self._misses.close()
        with self._lock:
            self._conn.close()


class MissReader:
    """One-row reads of what the cache does not hold, bounded (see the module's docstring)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.reads = 0
        self._lock = threading.Lock()
        self._unknown: dict[str, float] = {}  # id or key hash -> until when it is refused unasked
        self._tokens, self._refilled = float(MISS_READS_PER_S), time.monotonic()
        self._conn: psycopg.Connection | None = self._connect()
        self._closed = False
        self._rebuilding = False

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, application_name="charter-registry-miss")
        conn.execute(f"SET statement_timeout = {MISS_TIMEOUT_MS}")  # (the DSN's own options may set a schema)
        return conn

    def read(self, value: str, query: str, *params: str) -> tuple | None:
        """The row `query` finds for `value` (or for `params`, when given), or None: not there, or
        not asked (see the bounds)."""
        now = time.monotonic()
        until = self._unknown.get(value)
        if until is not None and now < until:
            return None
        # No waiting for another caller's read: the loop must not queue behind a worker thread.
        if not self._lock.acquire(blocking=False):
            return None
        try:
            conn = self._conn
            if conn is None or not self._take(now):
                return None
            self.reads += 1
            try:
                row = conn.execute(query, params or (value,)).fetchone()
            except psycopg.Error as exc:
                log.warning("registry: could not look up an unknown agent in PostgreSQL (%s); refused as unknown",
                            exc)
                self._conn = None
                self._rebuild(conn)
                return None
            if row is None:
                if len(self._unknown) >= MAX_UNKNOWN:  # bounded (it holds at most MISS_TTL's worth anyway)
                    self._unknown = {k: t for k, t in self._unknown.items() if t > now}
                self._unknown[value] = now + MISS_TTL
            return row
        finally:
            self._lock.release()

    def _take(self, now: float) -> bool:
        self._tokens = min(float(MISS_READS_PER_S), self._tokens + (now - self._refilled) * MISS_READS_PER_S)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _rebuild(self, broken: psycopg.Connection) -> None:
        """A new connection, made in a thread: until it is up, misses are refused unasked."""
        if self._rebuilding:
            return
        self._rebuilding = True

        def run() -> None:
            try:
                broken.close()
            except psycopg.Error:
                pass
            while not self._closed:
                try:
                    conn = self._connect()
                except psycopg.Error:
                    time.sleep(MISS_RECONNECT_S)
                    continue
                with self._lock:
                    if self._closed:
                        conn.close()
                    else:
                        self._conn = conn
                break
            self._rebuilding = False

        threading.Thread(target=run, name="charter-registry-miss", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _plain(row: tuple) -> tuple:
    """PostgreSQL hands BYTEA back as memoryview/bytes; `_record` wants what SQLite gives."""
    return (*row[:6], bytes(row[6]), *row[7:])

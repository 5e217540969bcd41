"""The agent registry, the invites and the bearer keys on PostgreSQL (`[store] backend = "postgres"`).

Several daemons of one installation share it. Reads are served from memory, as with SQLite; every
write commits to PostgreSQL first and sends a `NOTIFY charter_registry` in the same transaction.
Each daemon LISTENs on its own connection (a thread) and re-reads what changed, so an agent revoked
or suspended on one daemon is refused by every other one within milliseconds of the COMMIT
(tests/jetstream/test_two_daemons.py holds it to one second). After a lost listener connection the
thread reconnects with backoff and re-reads everything, since notifications sent meanwhile are gone.

An agent enrolled on one daemon can call another before that one's notification arrives: its id, or
its bearer key, is not in memory yet. Such a miss is asked of PostgreSQL before the caller refuses it
as unknown, by a thread of its own (`MissReader`; a daemon opens its connection at start, a command
on its first miss). The event loop waits for the answer `MISS_WAIT_S` at most, and
`MISS_WAIT_BUDGET_S` a second in all; it is refused meanwhile (fail closed), and what the read finds
is kept for the retry. The reads are bounded: one at a time (a miss while one is under way is
refused at once), `MISS_READS_PER_S` a second; an id or key PostgreSQL does not know is not asked
again for `MISS_TTL`; a failed read pauses them for `MISS_PAUSE_S`. A flood of made-up ids can use
up the reads, and then a newcomer waits for its notification, as before. What a read finds is kept
only if nothing in the cache changed while it was under way (a notification, a write here): a slow
read never brings back a revoked agent or key.

Redeeming an invite locks the invite's row (`FOR UPDATE`), so a single-use token enrols one agent
however many daemons race for it; a partial unique index keeps live names unique across daemons.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from charter.encoding import canonical
from charter.errors import NOT_FOUND, CharterError
from charter.identity.keys import PublicKey
from charter.identity.registry import (
    _AGENT_COLS,
    REVOKED,
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
MISS_WAIT_S = 0.02  # the longest the event loop waits for one miss's answer...
MISS_WAIT_BUDGET_S = 0.05  # ...and for all of them in a second (a flood on a slow PostgreSQL: 5% of the loop)
MISS_WAIT_OFF_LOOP_S = 2.0  # the longest another thread waits (`charter run`, a worker thread)
MISS_TIMEOUT_MS = 2000  # the server gives up a miss's statement after this
MISS_PAUSE_S = 2.0  # after a failed read, misses are refused unasked for this long
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
_KEY_AGENT_COLS = ", ".join(f"a.{c.strip()}" for c in _AGENT_COLS.split(","))  # the agent's, joined from api_keys


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
        # The cache, read without a lock (by the loop, worker threads, the listener): both dicts
        # are replaced, never changed in place, so nobody iterates one while it changes. Each
        # change is made under `_cache_lock` and bumps the generation: what a miss read found is
        # kept only if the generation is still the one it started at.
        self._agents: dict[str, AgentRecord] = {}
        self._keys: dict[str, str] = {}
        self._cache_lock = threading.Lock()
        self._generation = 0
        self.reload()
        self._misses = MissReader(dsn)
        if listen:  # a daemon: its first miss should not wait for the connection
            self._misses.warm()
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
        with self._cache_lock:
            agents = {agent_id: self._merged(rec) for agent_id, rec in fresh.items()}  # the gone ones dropped
            self._commit(agents, dict(keys))

    def _reload_agent(self, agent_id: str) -> None:
        # On the writer connection: the listener's own is locked by its `notifies()` generator.
        with self._lock:
            row = self._conn.execute(f"SELECT {_AGENT_COLS} FROM agents WHERE id = %s", (agent_id,)).fetchone()
            keys = self._conn.execute("SELECT key_hash, agent_id FROM api_keys WHERE revoked = 0").fetchall()
        with self._cache_lock:
            agents = dict(self._agents)
            if row is None:
                agents.pop(agent_id, None)
            else:
                rec = _record(_plain(row))
                agents[rec.id] = self._merged(rec)
            self._commit(agents, dict(keys))

    def _merged(self, rec: AgentRecord) -> AgentRecord:
        """The record to keep for `rec`: the one in memory with its status updated in place when only
        the status moved (holders of the record see it), else `rec`."""
        have = self._agents.get(rec.id)
        if have is not None and have.charter == rec.charter and have.public_key.b64 == rec.public_key.b64:
            have.status, have.reason = rec.status, rec.reason
            return have
        return rec

    def _commit(self, agents: dict[str, AgentRecord] | None = None, keys: dict[str, str] | None = None) -> None:
        """Put the new cache in place and bump the generation (the caller holds `_cache_lock`)."""
        if agents is not None:
            self._agents = agents
        if keys is not None:
            self._keys = keys
        self._generation += 1

    def _put(self, rec: AgentRecord) -> None:
        """A record written here: in memory at once, and no miss read under way may undo it."""
        with self._cache_lock:
            self._commit({**self._agents, rec.id: rec})

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
        if rec is None and agent_id.startswith("agt_") and len(agent_id) <= 64:
            rec = self._ask(agent_id, f"SELECT {_AGENT_COLS} FROM agents WHERE id = %s")
        return rec

    def agent_for_key(self, key_hash: str) -> AgentRecord | None:
        agent_id = self._keys.get(key_hash)
        if agent_id is not None:
            return self.get(agent_id)
        return self._ask(key_hash, f"SELECT {_KEY_AGENT_COLS} FROM api_keys k JOIN agents a ON a.id = k.agent_id "
                                   "WHERE k.key_hash = %s AND k.revoked = 0", key_hash=key_hash)

    def find(self, ref: str) -> AgentRecord:
        """As in memory; an agent not there yet (or only a revoked one of that name) is asked of
        PostgreSQL: by id, then the live agent of that name."""
        try:
            rec = super().find(ref)
        except CharterError as exc:
            if exc.code != NOT_FOUND:
                raise
            rec = None
        if rec is not None and (rec.status != REVOKED or rec.id == ref):
            return rec
        learned = self._ask(f"ref:{ref}", f"SELECT {_AGENT_COLS} FROM agents WHERE id = %s OR "
                                          "(name = %s AND status != 'revoked') ORDER BY id = %s DESC LIMIT 1",
                            ref, ref, ref)
        if learned is not None:
            return learned
        if rec is not None:
            return rec
        raise CharterError(NOT_FOUND, f"no agent with id or name {ref!r}", "agent")

    def _ask(self, key: str, query: str, *params: str, key_hash: str | None = None) -> AgentRecord | None:
        """The agent a miss read finds (see `_learn`); a late answer is learned for the retry."""
        gen = self._generation
        row = self._misses.read(key, query, *params, late=lambda found: self._learn(found, gen, key_hash=key_hash))
        return None if row is None else self._learn(row, gen, key_hash=key_hash)

    def _learn(self, row: tuple, gen: int, *, key_hash: str | None = None) -> AgentRecord | None:
        """Keep what a miss read found, unless the cache changed while it was under way (then
        what it found may be older than what the cache holds: the caller is refused, and asks
        again); what the cache holds already stays."""
        rec = _record(_plain(row))
        with self._cache_lock:
            have = self._agents.get(rec.id)
            if self._generation != gen:  # the cache's own answer, then
                if key_hash is None:
                    return have
                agent_id = self._keys.get(key_hash)
                return self._agents.get(agent_id) if agent_id else None
            if have is None:
                self._agents = {**self._agents, rec.id: rec}  # (no bump: nothing older was replaced)
                have = rec
            if key_hash is not None:
                self._keys = {**self._keys, key_hash: rec.id}
        return have

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
        self._put(rec)
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
        self._put(rec)
        return rec

    def set_status(self, agent_id: str, status: str, reason: str = "") -> AgentRecord:
        rec = self._agents[agent_id]
        with self._lock, self._conn.transaction():
            self._conn.execute("UPDATE agents SET status = %s, reason = %s, updated_at = %s WHERE id = %s",
                               (status, reason, now_ms(), agent_id))
            self._notify(self._conn, f"agent:{agent_id}")
        with self._cache_lock:
            rec.status, rec.reason = status, reason
            self._commit()
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
        self._put(new)
        return new

    # -- bearer keys -------------------------------------------------------------------------

    def add_api_key(self, agent_id: str, key_hash: str, *, replace: bool = True) -> None:
        """Bind a new bearer key (stored as a hash) to an agent; by default the old ones stop working."""
        with self._lock, self._conn.transaction():
            if replace:
                self._conn.execute("UPDATE api_keys SET revoked = 1 WHERE agent_id = %s", (agent_id,))
            self._conn.execute("INSERT INTO api_keys VALUES (%s,%s,%s,0)", (key_hash, agent_id, now_ms()))
            self._notify(self._conn, f"agent:{agent_id}")
        with self._cache_lock:
            keys = {h: a for h, a in self._keys.items() if a != agent_id} if replace else dict(self._keys)
            keys[key_hash] = agent_id
            self._commit(keys=keys)

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
        self._misses.close()
        with self._lock:
            self._conn.close()


class _Ask:
    """One read's hand-over: a caller that stopped waiting leaves `late` for the reader to call."""

    __slots__ = ("late", "finished")

    def __init__(self) -> None:
        self.late: Callable[[tuple], object] | None = None
        self.finished = False


class MissReader:
    """One-row reads of what the cache does not hold, on a thread and a connection of their own,
    bounded (see the module's docstring)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.reads = 0
        self._lock = threading.Lock()  # guards the bounds below and `_closed`; never held while waiting
        self._unknown: dict[str, float] = {}  # id or key -> until when it is refused unasked
        self._tokens = float(MISS_READS_PER_S)
        self._wait_left = MISS_WAIT_BUDGET_S  # what the event loop may still spend waiting, this second
        self._refilled = time.monotonic()
        self._paused_until = 0.0
        self._busy = False
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None  # its one thread, and the connection, on first use
        self._conn: psycopg.Connection | None = None  # used by that thread only

    def read(self, key: str, query: str, *params: str, late: Callable[[tuple], object] | None = None
             ) -> tuple | None:
        """The row `query` finds for `params` (or `key`), or None: not there, not asked (see the
        bounds), or not answered in time; a row found after that goes to `late`."""
        on_loop = _on_event_loop()
        now = time.monotonic()
        with self._lock:
            if self._closed or self._busy or now < self._paused_until:
                return None
            until = self._unknown.get(key)
            if until is not None and now < until:
                return None
            elapsed, self._refilled = now - self._refilled, now
            self._tokens = min(float(MISS_READS_PER_S), self._tokens + elapsed * MISS_READS_PER_S)
            self._wait_left = min(MISS_WAIT_BUDGET_S, self._wait_left + elapsed * MISS_WAIT_BUDGET_S)
            if self._tokens < 1.0:
                return None
            self._tokens -= 1.0
            wait = min(MISS_WAIT_S, self._wait_left) if on_loop else MISS_WAIT_OFF_LOOP_S
            self._busy = True
            self.reads += 1
            pool = self._thread()
        ask = _Ask()
        try:
            answer = pool.submit(self._run, ask, key, query, params or (key,))
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._busy = False
            return None
        started = time.monotonic()
        try:
            return answer.result(timeout=wait)
        except FuturesTimeout:
            with self._lock:
                if not ask.finished:  # refused for now; what the read finds is kept for a retry
                    ask.late = late
                    return None
            return answer.result()  # it has just finished: the result is a moment away
        finally:
            if on_loop:
                with self._lock:
                    self._wait_left -= time.monotonic() - started

    def _thread(self) -> ThreadPoolExecutor:
        if self._pool is None:  # (under _lock)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="charter-registry-miss")
        return self._pool

    def warm(self) -> Future[None] | None:
        """Open the connection now, on the reader's thread (a failure is left to the first read)."""
        with self._lock:
            if self._closed:
                return None
            return self._thread().submit(self._open)

    def _open(self) -> None:
        try:
            if self._conn is None and not self._closed:
                self._conn = self._connect()
        except Exception as exc:  # noqa: BLE001 - the first miss tries again, and says so
            log.warning("registry: no connection for looking up unknown agents yet (%s)", exc)

    def _run(self, ask: _Ask, key: str, query: str, params: tuple[str, ...]) -> tuple | None:
        row: tuple | None = None
        failed = False
        try:
            if self._closed:
                return None
            if self._conn is None:
                self._conn = self._connect()
            row = self._conn.execute(query, params).fetchone()
        except Exception as exc:  # noqa: BLE001 - any failure: refused as unknown, and paused
            failed = True
            log.warning("registry: could not look up an unknown agent in PostgreSQL (%s); refused as unknown for "
                        "%gs", exc, MISS_PAUSE_S)
            self._close_conn()
        finally:
            now = time.monotonic()
            with self._lock:
                if failed:
                    self._paused_until = now + MISS_PAUSE_S
                elif row is None:
                    if len(self._unknown) >= MAX_UNKNOWN:  # (at most MISS_TTL's worth of reads are live)
                        self._unknown = {k: t for k, t in self._unknown.items() if t > now}
                    self._unknown[key] = now + MISS_TTL
                ask.finished = True
                late = ask.late
            try:
                if late is not None and row is not None:  # before the next read may start
                    late(row)
            except Exception:  # noqa: BLE001 - only a cache left unfilled: the retry asks again
                log.exception("registry: keeping a late answer about an unknown agent failed")
            finally:
                with self._lock:
                    self._busy = False
        return row

    def _connect(self) -> psycopg.Connection:
        # Keepalives and a TCP user timeout: a PostgreSQL host gone silent fails the read in
        # seconds, not after the kernel's retransmissions (minutes); no caller waits for it.
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, application_name="charter-registry-miss",
                               keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                               tcp_user_timeout=5000)
        try:
            conn.execute(f"SET statement_timeout = {MISS_TIMEOUT_MS}")  # (the DSN's own options may set a schema)
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        """Stop: a read under way ends first (its statement timeout bounds it), then the connection."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._close_conn()


def _on_event_loop() -> bool:
    """Whether the caller is an event loop's thread (which must not wait long for a miss)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _plain(row: tuple) -> tuple:
    """PostgreSQL hands BYTEA back as memoryview/bytes; `_record` wants what SQLite gives."""
    return (*row[:6], bytes(row[6]), *row[7:])

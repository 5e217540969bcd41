"""The default log: one SQLite table in WAL mode, appended in IMMEDIATE transactions.

The head is read inside the write transaction, so even two processes appending to one file keep a
single chain. A publisher's receipt is returned only after COMMIT.

Checkpoints (copying the WAL back into the database file, with an fsync of each) run on a
background thread with its own connection, at the lowest priority, so that their milliseconds of
I/O and CPU do not stall the event loop inside somebody's request; see `charter.db.Checkpointer`.

Large reads go the same way (`_Reader`). The archivist reading a segment's worth of entries, or a
capsule build looking back over 20,000 entries for the few operator events it shows, held the
event loop for 10-30 ms each (sampled under the gateway benchmark's load), and every request that
arrived meanwhile waited that long. On the reader thread the query runs in SQLite with the GIL
released. Small reads stay inline: the thread hop costs more than they do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from charter.bus.envelope import Envelope, parse
from charter.bus.log.base import (
    GENESIS,
    ChainBreak,
    DuplicateIds,
    ConsumerState,
    LogEntry,
    Receipt,
    VerifyReport,
    entry_hash,
)
from charter.bus.log.scan import matching, subject_glob
from charter.bus.log.witness import KeyWitness
from charter.db import Checkpointer, connect
from charter.encoding import loads
from charter.identity.keys import PublicKey
from charter.errors import NOT_FOUND, CharterError

SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    subject     TEXT NOT NULL,
    sender      TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    nonce       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    raw         BLOB NOT NULL,
    prev        BLOB NOT NULL,
    hash        BLOB NOT NULL,
    appended_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_ts ON log (ts);
-- The operator's own events (lifecycle, decisions, health): what capsules and reflection look for
-- among the agents' traffic. Partial, so an agent's append does not pay for it.
CREATE INDEX IF NOT EXISTS log_operator ON log (seq) WHERE sender = 'operator';
CREATE TABLE IF NOT EXISTS consumers (
    owner      TEXT NOT NULL,
    name       TEXT NOT NULL,
    pattern    TEXT NOT NULL,
    acked_seq  INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, name)
);
"""

T = TypeVar("T")


class _Reader:
    """One thread with its own read-only connection, for reads too large to run on the event loop.

    Its reads see every transaction committed before they were handed over, so a caller reads
    what it appended. Opened on the first large read."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="charter-log-read")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect(self._path, readonly=True)
        return self._db

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(self._conn()))

    def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._pool.submit(shut)
        self._pool.shutdown(wait=True)


_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
INLINE_ROWS = 64  # a read that can return at most this many entries runs inline; a larger one on the reader thread
_COLS = "seq, id, subject, sender, ts, kind, raw, hash, prev, appended_at"


def _entry(row: tuple) -> LogEntry:
    return LogEntry(row[0], row[1], row[2], row[3], row[4], row[5], bytes(row[6]), bytes(row[7]), bytes(row[8]), row[9])


def _read(db: sqlite3.Connection, after_seq: int, limit: int) -> list[LogEntry]:
    rows = db.execute(f"SELECT {_COLS} FROM log WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
    return [_entry(r) for r in rows]


def _read_matching(db: sqlite3.Connection, patterns: Sequence[str], after: int, upto: int, limit: int,
                   newest_first: bool, sender: str | None) -> list[LogEntry]:
    where = " OR ".join("subject GLOB ?" for _ in patterns)
    if sender is not None:  # checked by the caller: a literal, so that the partial index applies
        where = f"sender = '{sender}' AND ({where})"
    order = "DESC" if newest_first else "ASC"
    out: list[LogEntry] = []
    lo, hi = after, upto
    while len(out) < limit and lo < hi:
        rows = db.execute(
            f"SELECT {_COLS} FROM log WHERE seq > ? AND seq <= ? AND ({where}) ORDER BY seq {order} LIMIT ?",
            (lo, hi, *(subject_glob(p) for p in patterns), limit - len(out)),
        ).fetchall()
        if not rows:
            break
        out += matching([_entry(r) for r in rows], patterns)  # the GLOB is a superset
        if newest_first:
            hi = rows[-1][0] - 1
        else:
            lo = rows[-1][0]
    return out


class SqliteLog:
    """EventLog on SQLite. Use from one event loop; appends are short and run inline."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self.path = path
        self._db = connect(path, synchronous=synchronous)
        self._db.executescript(SCHEMA)
        self._changed = asyncio.Event()
        self._synchronous = synchronous
        self._checkpointer: Checkpointer | None = None  # started by the first append
        self._reader: _Reader | None = None  # started by the first large read
        self._closed = False

    # -- writing ---------------------------------------------------------------------------

    def append_sync(self, envelopes: Sequence[Envelope]) -> list[Receipt]:
        db = self._db
        now = time.time_ns() // 1_000_000
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0], bytes(row[1])) if row else (0, GENESIS)
            rows = []
            receipts = []
            for env in envelopes:
                seq += 1
                h = entry_hash(prev, seq, env.raw)
                rows.append((seq, env.id, env.subject, env.sender, env.ts, env.nonce, env.kind, env.raw, prev, h, now))
                receipts.append(Receipt(seq, env.id, h.hex()))
                prev = h
            db.executemany("INSERT INTO log VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.execute("COMMIT")
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK")
            raise DuplicateIds(self._duplicates(envelopes)) from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if self._checkpointer is None:  # (the inline checkpoint's backstop is set by charter.db.connect)
            self._checkpointer = Checkpointer(self.path, self._synchronous, "charter-log-checkpoint")
        self._checkpointer.dirty = True
        self._notify()
        return receipts

    def _duplicates(self, envelopes: Sequence[Envelope]) -> set[int]:
        ids = [e.id for e in envelopes]
        known = {r[0] for r in self._db.execute(
            f"SELECT id FROM log WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()}
        seen: set[str] = set()
        dups = set()
        for i, eid in enumerate(ids):
            if eid in known or eid in seen:
                dups.add(i)
            seen.add(eid)
        return dups

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def append(self, envelopes: Sequence[Envelope]) -> list[Receipt]:
        if not envelopes:
            return []
        return self.append_sync(envelopes)

    # -- reading ---------------------------------------------------------------------------

    def head_sync(self) -> tuple[int, bytes]:
        row = self._db.execute("SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], bytes(row[1])) if row else (0, GENESIS)

    async def head(self) -> tuple[int, bytes]:
        return self.head_sync()

    def read_sync(self, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        return _read(self._db, after_seq, limit)

    async def read(self, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        # by what there is to read, not what is asked for: a follower asking for 500 after each
        # append usually finds one
        if limit <= INLINE_ROWS or self.head_sync()[0] - after_seq <= INLINE_ROWS:
            return _read(self._db, after_seq, limit)
        return await self._off_loop(lambda db: _read(db, after_seq, limit))

    async def read_matching_native(self, patterns: Sequence[str], *, after: int, upto: int, limit: int,
                                   newest_first: bool = False, sender: str | None = None) -> list[LogEntry]:
        """`scan.read_matching` done by SQLite: the subject filter runs in C over the seq range
        (for the operator's events, over the `log_operator` index only), on the reader thread:
        a scan over thousands of entries that match nothing takes milliseconds."""
        if sender is not None and not _PLAIN_ID.fullmatch(sender):
            raise ValueError(f"not a sender id: {sender!r}")
        pats = tuple(patterns)
        if upto - after <= INLINE_ROWS:  # a short range: cheaper here than a thread hop
            return _read_matching(self._db, pats, after, upto, limit, newest_first, sender)
        return await self._off_loop(lambda db: _read_matching(db, pats, after, upto, limit, newest_first, sender))

    async def _off_loop(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:  # as the closed main connection would say, not a new reader nobody closes
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        if self._reader is None:
            self._reader = _Reader(self.path)
        return await self._reader.run(fn)

    async def get(self, seq: int) -> LogEntry | None:
        row = self._db.execute(f"SELECT {_COLS} FROM log WHERE seq = ?", (seq,)).fetchone()
        return _entry(row) if row else None

    async def wait(self, after_seq: int, timeout: float) -> int:
        event = self._changed
        head = self.head_sync()[0]
        if head > after_seq:
            return head
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        return self.head_sync()[0]

    async def recent_nonces(self, since_ms: int) -> list[tuple[str, str, int]]:
        return self._db.execute("SELECT sender, nonce, ts FROM log WHERE ts >= ?", (since_ms,)).fetchall()

    async def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        return await asyncio.to_thread(verify_file, self.path, progress)

    # -- consumers -------------------------------------------------------------------------

    async def consumer(self, owner: str, name: str) -> ConsumerState | None:
        row = self._db.execute(
            "SELECT owner, name, pattern, acked_seq FROM consumers WHERE owner = ? AND name = ?", (owner, name)
        ).fetchone()
        return ConsumerState(*row) if row else None

    async def put_consumer(self, state: ConsumerState) -> None:
        self._db.execute(
            "INSERT INTO consumers VALUES (?,?,?,?,?) ON CONFLICT (owner, name) DO UPDATE SET "
            "pattern = excluded.pattern, acked_seq = excluded.acked_seq, updated_at = excluded.updated_at",
            (state.owner, state.name, state.pattern, state.acked_seq, time.time_ns() // 1_000_000),
        )

    async def ack(self, owner: str, name: str, seq: int) -> ConsumerState:
        """Acknowledge every entry up to `seq` (cumulative, like JetStream's AckAll); never moves back."""
        self._db.execute(
            "UPDATE consumers SET acked_seq = MAX(acked_seq, ?), updated_at = ? WHERE owner = ? AND name = ?",
            (seq, time.time_ns() // 1_000_000, owner, name),
        )
        state = await self.consumer(owner, name)
        if state is None:
            raise CharterError(NOT_FOUND, f"no consumer named {name!r}; subscribe with it first", "consumer")
        return state

    def close_sync(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        self._db.close()

    async def close(self) -> None:
        self.close_sync()


def read_horizon(db: sqlite3.Connection) -> tuple[int, bytes, dict | None] | None:
    """The retention boundary, if the archivist removed archived entries from this database.

    (seq, hash of entry seq, the signature witness's knowledge at seq); the `log_horizon` table
    belongs to `charter.archive.retention`. None if nothing was ever removed.
    """
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'log_horizon'").fetchone() is None:
        return None
    row = db.execute("SELECT seq, hash, witness FROM log_horizon WHERE id = 1").fetchone()
    if row is None:
        return None
    try:
        snapshot = loads(row[2]) if row[2] else None
    except ValueError:
        snapshot = None  # unreadable: signatures before the boundary's enrolments then fail loudly
    return row[0], bytes(row[1]), snapshot if isinstance(snapshot, dict) else None


def verify_file(path: Path, progress: Callable[[int, int], None] | None = None,
                root: PublicKey | None = None) -> VerifyReport:
    """Recompute the whole chain from a database file, read-only. Names every break it finds.

    With the root public key, every entry's signature is checked as well (see `KeyWitness`).
    """
    db = connect(path, readonly=True)
    witness = KeyWitness(root) if root is not None else None
    try:
        report = VerifyReport()
        total = db.execute("SELECT COUNT(*) FROM log").fetchone()[0]
        expected_seq, prev = 1, GENESIS
        horizon = read_horizon(db)
        if horizon is not None:  # older entries were archived and removed: the chain continues from there
            report.horizon_seq, prev = horizon[0], horizon[1]
            expected_seq = horizon[0] + 1
            if witness is not None and horizon[2]:
                witness.restore(horizon[2])
        cur = db.execute(f"SELECT {_COLS} FROM log ORDER BY seq")
        while batch := cur.fetchmany(2000):
            for row in batch:
                e = _entry(row)
                if e.seq != expected_seq:
                    reason = f"sequence jumps from {expected_seq - 1} to {e.seq}: entries missing"
                    report.breaks.append(ChainBreak(expected_seq, reason))
                    expected_seq = e.seq
                if e.prev != prev:
                    report.breaks.append(ChainBreak(e.seq, "prev_hash does not match the previous entry's hash"))
                if entry_hash(e.prev, e.seq, e.raw) != e.hash:
                    report.breaks.append(ChainBreak(e.seq, "hash does not match the entry's content"))
                else:
                    try:
                        env = parse(e.raw, max_bytes=2**31)
                        if (env.id, env.subject, env.sender, env.ts, env.kind) != (e.id, e.subject, e.sender, e.ts, e.kind):
                            report.breaks.append(ChainBreak(e.seq, "indexed columns differ from the signed envelope"))
                        elif witness is not None and (why := witness.check(env)):
                            report.breaks.append(ChainBreak(e.seq, why))
                    except CharterError as exc:
                        report.breaks.append(ChainBreak(e.seq, f"stored envelope does not parse: {exc.message}"))
                prev = e.hash
                expected_seq = e.seq + 1
                report.checked += 1
                report.head_seq, report.head_hash = e.seq, e.hash.hex()
            if progress:
                progress(report.checked, total)
        return report
    except sqlite3.DatabaseError as exc:
        report = VerifyReport()
        report.breaks.append(ChainBreak(0, f"database unreadable: {exc}"))
        return report
    finally:
        db.close()

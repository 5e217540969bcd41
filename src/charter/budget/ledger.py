"""The budget ledger: reserve before a paid call, settle after it, release what was not used.

Exact by construction. Every reservation is one SQLite transaction that checks every limit that
applies (global, the role's, the agent's; per period; in micro-dollars and in tokens) against
`committed + reserved` and takes its share only if all of them fit. Writers from any number of
processes are serialised by an exclusive `flock` taken before the transaction, which wakes the next
writer the moment the lock is free (SQLite's own busy handler sleeps in steps of milliseconds).

A reservation carries an expiry: one leaked by a crashed client is swept back into the budget by
the next writer after its TTL (every expired one, however many leaked, before any limit is checked).
A reservation made with `on_expiry="book"` is booked at its full amount instead: the gateway's, for
a call the daemon sent upstream and died before settling. The provider may have billed it, and the
reservation is the most it can have cost, so a crash never returns money that may be spent.

Settling books the real use, always: `committed` is the sum of what the `spend` rows say, so a
budget never reads as within while its spend is over. Use beyond the reservation (a caller that
under-reserved, or settled after its reservation expired and the money went back) is an *overrun*:
the settlement says so, the spend row is flagged, and `Settlement.alerts` names every limit the
booking pushed over its hard cap, for the caller to publish. Reserving enough up front is what
keeps an overrun from happening; the gateway sends the backend the output limit it reserved for.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import orjson
from ulid import ULID

from charter.budget.periods import PERIODS, period_key
from charter.db import Checkpointer, connect
from charter.errors import BAD_REQUEST, CONFLICT, NOT_FOUND, CharterError

log = logging.getLogger("charter.budget")

BUDGET_EXCEEDED = "budget_exceeded"
UNITS = ("usd", "tokens")
SWEEP_BATCH = 500  # expired reservations read at a time; a sweep repeats until none is left
ON_EXPIRY = ("release", "book")  # what a reservation's expiry does: give its money back, or book all of it

SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_limits (
    scope      TEXT NOT NULL,
    unit       TEXT NOT NULL CHECK (unit IN ('usd', 'tokens')),
    period     TEXT NOT NULL CHECK (period IN ('hour', 'day', 'month', 'total')),
    hard       INTEGER NOT NULL CHECK (hard >= 0),
    soft_ratio REAL NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (scope, unit, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_usage (
    scope      TEXT NOT NULL,
    unit       TEXT NOT NULL,
    period     TEXT NOT NULL,
    period_key TEXT NOT NULL,
    reserved   INTEGER NOT NULL DEFAULT 0,
    committed  INTEGER NOT NULL DEFAULT 0,
    alerted    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, unit, period, period_key)
) WITHOUT ROWID;
-- Keyed tables are WITHOUT ROWID (a row is found and written in one b-tree, not a key index and
-- the table), and the index of held reservations, the sweep's, is partial: it holds only what is
-- held, a page or two, not one entry per reservation ever made. A reservation and its settlement
-- took ~9% less time for it.
CREATE TABLE IF NOT EXISTS reservations (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    role        TEXT NOT NULL,
    model       TEXT NOT NULL,
    action      TEXT NOT NULL,
    usd         INTEGER NOT NULL,
    tokens      INTEGER NOT NULL,
    charges     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    closed_at   INTEGER,
    on_expiry   TEXT NOT NULL DEFAULT 'release'
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_held_expiry ON reservations (expires_at) WHERE state = 'held';
CREATE TABLE IF NOT EXISTS spend (
    id             INTEGER PRIMARY KEY,
    reservation_id TEXT NOT NULL,
    agent_id       TEXT NOT NULL,
    role           TEXT NOT NULL,
    model          TEXT NOT NULL,
    usd            INTEGER NOT NULL,
    tokens_in      INTEGER NOT NULL,
    tokens_out     INTEGER NOT NULL,
    ts             INTEGER NOT NULL,
    day            TEXT NOT NULL,
    overrun        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spend_ts ON spend (ts);
CREATE TABLE IF NOT EXISTS ledger_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Each ledger table and its columns, in the order they were added (`charter migrate` copies them to
# PostgreSQL; an older charter.db held them, see charter.budget.relocate).
TABLES = {
    "budget_limits": "scope, unit, period, hard, soft_ratio, updated_at",
    "budget_usage": "scope, unit, period, period_key, reserved, committed, alerted",
    "reservations": "id, agent_id, role, model, action, usd, tokens, charges, state, created_at, expires_at, "
                    "closed_at, on_expiry",
    "spend": "id, reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, overrun",
}
KEYS = {"budget_limits": "scope, unit, period", "budget_usage": "scope, unit, period, period_key",
        "reservations": "id", "spend": "id"}  # each table's key: the order a copy of it is read in
COLUMN_DEFAULTS = {"on_expiry": "'release'"}  # for a table written before the column existed


def _now() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # global | role:NAME | agent:ID
    unit: str  # usd (micro-dollars) | tokens
    period: str
    hard: int
    soft_ratio: float = 0.8

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "unit": self.unit, "period": self.period, "hard": self.hard,
                "soft_ratio": self.soft_ratio}


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    usd: int
    tokens: int
    expires_at: int
    alerts: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"reservation_id": self.id, "usd_micros": self.usd, "tokens": self.tokens,
                "expires_at": self.expires_at}


@dataclass(frozen=True, slots=True)
class SettleItem:
    """One settlement to book in a batch (`settle_batch`): a reservation and its real use."""

    reservation_id: str
    usd: int
    tokens_in: int
    tokens_out: int
    agent_id: str | None = None


@dataclass(slots=True)
class Settlement:
    reservation_id: str
    usd: int
    tokens: int
    overrun: bool
    late: bool
    alerts: list[dict[str, Any]] = field(default_factory=list)


def _charges(text: str) -> list[tuple[str, str, str, str, int, int | None]]:
    """A reservation's charges: (scope, unit, period, period_key, amount, hard at reservation time).

    Rows written before the limit was recorded with each charge have 5 fields; their hard is None.
    """
    return [(c[0], c[1], c[2], c[3], c[4], c[5] if len(c) > 5 else None) for c in orjson.loads(text)]


def _unhold(db: Any, charges: str, *, book: bool = False) -> None:
    """Take a reservation's held amounts off every limit it was charged on: given back (release,
    expiry), or with `book` moved to committed (a gateway reservation's expiry)."""
    for scope, unit, period, key, amount, _ in _charges(charges):
        if amount:
            db.execute(
                "UPDATE budget_usage SET reserved = reserved - ?, committed = committed + ? "
                "WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                (amount, amount if book else 0, scope, unit, period, key),
            )


def _add_on_expiry(db: Any) -> None:
    """A ledger from before `on_expiry`: add the column (its reservations all give money back)."""
    if "on_expiry" in {r[1] for r in db.execute("PRAGMA table_info(reservations)")}:
        return
    try:
        db.execute("ALTER TABLE reservations ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'release'")
    except sqlite3.OperationalError as exc:  # another process added it between the look and the ALTER
        if "duplicate column" not in str(exc):
            raise


@dataclass(frozen=True, slots=True)
class Booked:
    """A reservation its expiry booked in full (`on_expiry = 'book'`)."""

    reservation_id: str
    agent_id: str
    model: str
    usd: int
    tokens: int


PLAIN_BATCH_MAX = 500  # settlements booked in a few statements at most (one `IN (...)` of their ids)

T = TypeVar("T")
R = TypeVar("R")


def _each_alone(db: Any, items: Iterable[T], one: Callable[[T], R]) -> list[R | Exception]:
    """`one(item)` for each item, each in a savepoint of its own: one that fails is rolled back
    alone, and its exception is its result (a failing rollback ends them all)."""
    out: list[R | Exception] = []
    for item in items:
        db.execute("SAVEPOINT item")
        try:
            out.append(one(item))
        except Exception as exc:  # noqa: BLE001 - this item's failure, returned as its result
            db.execute("ROLLBACK TO item")
            out.append(exc)
        db.execute("RELEASE item")
    return out


def report_booked(booked: Sequence[Booked]) -> None:
    """Say so, loudly, once committed: a call's real cost is unknown and its whole reservation was booked."""
    for b in booked:
        log.warning("reservation %s (agent %s, %s) expired unsettled and was booked at its full amount: %s, %d tokens",
                    b.reservation_id, b.agent_id, b.model or "-", describe("usd", b.usd), b.tokens,
                    extra={"fields": {"reservation_id": b.reservation_id, "agent": b.agent_id, "model": b.model,
                                      "usd_micros": b.usd, "tokens": b.tokens}})


def validate_limit(limit: Limit) -> None:
    """Refuse a malformed limit, naming the field and the value that is wrong."""
    if limit.unit not in UNITS:
        raise CharterError(BAD_REQUEST, f"unknown unit {limit.unit!r}: use {' or '.join(UNITS)}", "unit")
    if limit.period not in PERIODS:
        raise CharterError(BAD_REQUEST, f"unknown period {limit.period!r}: use one of {', '.join(PERIODS)}", "period")
    if not (limit.scope == "global" or (limit.scope.startswith(("role:", "agent:")) and limit.scope.split(":", 1)[1])):
        raise CharterError(BAD_REQUEST, f"scope {limit.scope!r} is not global, role:NAME or agent:ID", "scope")
    if limit.hard < 0:
        raise CharterError(BAD_REQUEST, f"the limit must be 0 or more, got {limit.hard}", "limit")
    if not 0 < limit.soft_ratio <= 1:
        raise CharterError(BAD_REQUEST, f"soft_ratio must be in (0, 1], got {limit.soft_ratio:g}", "soft_ratio")


def overrun_alert(reservation_id: str, model: str, r_usd: int, r_tokens: int, usd: int, tokens: int,
                  late: bool, crossed: list[dict[str, Any]]) -> dict[str, Any]:
    """The alert a settlement beyond its reservation raises: what was held, what was booked, which caps broke."""
    return {"kind": "overrun", "reservation_id": reservation_id, "model": model, "late": late,
            "reserved_usd": r_usd, "reserved_tokens": r_tokens, "usd": usd, "tokens": tokens, "crossed": crossed}


def _crossed(scope: str, unit: str, period: str, key: str, used: int, hard: int) -> dict[str, Any]:
    return {"scope": scope, "unit": unit, "period": period, "period_key": key, "used": used, "hard": hard,
            "over": used - hard}


def check_on_expiry(on_expiry: str) -> None:
    if on_expiry not in ON_EXPIRY:
        raise CharterError(BAD_REQUEST, f"on_expiry is {' or '.join(ON_EXPIRY)}, got {on_expiry!r}", "on_expiry")


def describe(unit: str, amount: int) -> str:
    return f"${amount / 1e6:.6f}".rstrip("0").rstrip(".") if unit == "usd" else f"{amount} tokens"


class Ledger:
    """The ledger in its own SQLite file (`budget.db` in a home).

    Its own file, not charter.db: there the log's appends and the ledger's commits each emptied the
    other's page cache (a connection drops its cache whenever another has written the file since),
    so every reservation re-read its pages, and every append the log's. Apart (gateway_compare.py
    --priced, against one file, on a noisy VM): at 16 calls in flight the added p99 fell to x0.35,
    x0.60 and x0.64 in three runs of four (x1.29 in the fourth), the slowest calls no longer waiting
    out 20-45 ms; at one call at a time the added p50 was x0.82 to x1.02 in six runs (median x0.94).
    Its WAL is checkpointed by a background thread of its own, started by the first write
    (`background_checkpoints=False` leaves it to SQLite's inline backstop).
    """

    remote = False  # a local file: asked inline, even from the event loop (a thread hop costs more)

    def __init__(self, path: Path, *, timezone: str = "UTC", synchronous: str = "normal",
                 background_checkpoints: bool = True) -> None:
        self.path = path
        self.tz = ZoneInfo(timezone)
        if not path.exists():  # created private, as charter.db is: SQLite gives its WAL the same mode
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = connect(path, synchronous=synchronous)
        self._synchronous = synchronous
        self._background_checkpoints = background_checkpoints
        self._checkpointer: Checkpointer | None = None
        self._db.executescript(SCHEMA)
        _add_on_expiry(self._db)
        self._lock_path = path.with_name(path.name + ".ledger.lock")
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._thread_lock = threading.Lock()
        # The limits that bind a scope set, read once and kept until any process changes a limit.
        # Reading them from SQLite on every call cost ~0.1 ms in the daemon: the log's append on the
        # same file empties this connection's page cache each time. The lock file's first 8 bytes
        # count the changes (written after each change's COMMIT), so a cached entry is checked with
        # one pread, and a change made by another process is seen by the next reservation.
        self._limits_cache: dict[tuple[str, ...], tuple[bytes, list[Limit]]] = {}

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        self._db.close()
        os.close(self._lock_fd)

    def _committed(self) -> None:
        if not self._background_checkpoints:
            return
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.path, self._synchronous, "charter-ledger-checkpoint")
        self._checkpointer.dirty = True

    @contextmanager
    def _txn(self, *, limits_changed: bool = False) -> Iterator[Any]:
        """An IMMEDIATE transaction under the cross-process writer lock.

        `limits_changed` counts a change of the limits once it is committed (never before: a reader
        seeing the new count must find the new limits).
        """
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._after_commit(limits_changed)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _after_commit(self, limits_changed: bool) -> None:
        """Wake the checkpointer; count a change of the limits (see `_txn`)."""
        self._committed()
        if limits_changed:
            count = int.from_bytes(self._limits_version() or b"\0", "big") + 1
            os.pwrite(self._lock_fd, count.to_bytes(8, "big"), 0)

    def _limits_version(self) -> bytes:
        return os.pread(self._lock_fd, 8, 0)

    # -- limits ----------------------------------------------------------------------------

    def set_limit(self, limit: Limit) -> None:
        validate_limit(limit)
        with self._txn(limits_changed=True) as db:
            db.execute(
                "INSERT INTO budget_limits VALUES (?,?,?,?,?,?) ON CONFLICT (scope, unit, period) DO UPDATE SET "
                "hard = excluded.hard, soft_ratio = excluded.soft_ratio, updated_at = excluded.updated_at",
                (limit.scope, limit.unit, limit.period, limit.hard, limit.soft_ratio, _now()),
            )

    def remove_limit(self, scope: str, unit: str, period: str) -> None:
        validate_limit(Limit(scope, unit, period, 0))
        with self._txn(limits_changed=True) as db:
            cur = db.execute("DELETE FROM budget_limits WHERE scope = ? AND unit = ? AND period = ?", (scope, unit, period))
            if cur.rowcount == 0:
                raise CharterError(NOT_FOUND, f"no {period} {unit} limit for {scope}", "budget")

    def limits(self, scopes: list[str] | None = None) -> list[Limit]:
        if scopes is None:
            rows = self._db.execute("SELECT scope, unit, period, hard, soft_ratio FROM budget_limits").fetchall()
        else:
            marks = ",".join("?" * len(scopes))
            rows = self._db.execute(
                f"SELECT scope, unit, period, hard, soft_ratio FROM budget_limits WHERE scope IN ({marks})", scopes
            ).fetchall()
        return [Limit(*r) for r in rows]

    def _scoped_limits(self, scopes: tuple[str, ...]) -> list[Limit]:
        """`limits(scopes)` through the cache (see __init__)."""
        count = self._limits_version()
        hit = self._limits_cache.get(scopes)
        if hit is not None and hit[0] == count:
            return hit[1]
        if len(self._limits_cache) > 4096:
            self._limits_cache.clear()
        # Read after the count: a change committed meanwhile has a later count, so this entry is
        # read again next time rather than kept.
        found = self.limits(list(scopes))
        self._limits_cache[scopes] = (count, found)
        return found

    def applicable(self, agent_id: str, role: str, defaults: list[Limit]) -> list[Limit]:
        """The limits that bind an agent: global, its role's, its own (explicit ones replace defaults)."""
        found = self._scoped_limits(("global", f"role:{role}", f"agent:{agent_id}"))
        explicit = {(lim.unit, lim.period) for lim in found if lim.scope == f"agent:{agent_id}"}
        return found + [d for d in defaults if (d.unit, d.period) not in explicit]

    # -- reserve, settle, release ----------------------------------------------------------

    def _sweep(self, db: Any, now: int) -> tuple[int, list[Booked]]:
        """Close every expired reservation, in batches, until none is left: its money goes back, or,
        with `on_expiry = 'book'`, all of it is booked as spent (see the module doc). Returns how
        many, and those booked, for the caller to report once the transaction has committed.

        All of them, not one batch: a reservation checked after a large leak must not be refused for
        money whose TTL has passed.
        """
        swept, booked = 0, []
        while True:
            rows = db.execute(
                "SELECT id, charges, on_expiry, agent_id, role, model, usd, tokens, created_at FROM reservations "
                "WHERE state = 'held' AND expires_at <= ? LIMIT ?",
                (now, SWEEP_BATCH),
            ).fetchall()
            for rid, charges, on_expiry, agent_id, role, model, usd, tokens, created_at in rows:
                book = on_expiry == "book"
                _unhold(db, charges, book=book)
                db.execute("UPDATE reservations SET state = ?, closed_at = ? WHERE id = ?",
                           ("settled" if book else "expired", now, rid))
                if not book:
                    continue
                # Spent when the call was made, the period its charges are in; the split between input
                # and output is unknown, so all of it counts as input.
                db.execute(
                    "INSERT INTO spend (reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, overrun) "
                    "VALUES (?,?,?,?,?,?,0,?,?,0)",
                    (rid, agent_id, role, model, usd, tokens, created_at, period_key("day", created_at, self.tz)),
                )
                booked.append(Booked(rid, agent_id, model, usd, tokens))
            swept += len(rows)
            if len(rows) < SWEEP_BATCH:
                return swept, booked

    def reserve(self, *, agent_id: str, role: str, usd: int, tokens: int, limits: list[Limit],
                model: str = "", action: str = "model.call", ttl_s: float = 600.0, on_expiry: str = "release",
                headroom: int = 0, now: int | None = None) -> Reservation:
        """Take `usd` micro-dollars and `tokens` from every applicable limit, or none of them.

        `on_expiry`: what happens to a reservation still held at its TTL: "release" gives its money
        back, "book" books all of it (a caller that cannot tell, after a crash, what was spent).
        `headroom`: refused unless every limit keeps `headroom` times the amount free after it, and
        unless it would raise no soft alert (a spare reservation, made ahead of a call that may not
        come: charter.budget.spares; the call that is made raises the alert)."""
        return self.reserve_many(1, agent_id=agent_id, role=role, usd=usd, tokens=tokens, limits=limits, model=model,
                                 action=action, ttl_s=ttl_s, on_expiry=on_expiry, headroom=headroom, now=now)[0]

    def reserve_many(self, count: int, *, agent_id: str, role: str, usd: int, tokens: int, limits: list[Limit],
                     model: str = "", action: str = "model.call", ttl_s: float = 600.0, on_expiry: str = "release",
                     headroom: int = 0, now: int | None = None) -> list[Reservation]:
        """`count` reservations like `reserve`'s, in one transaction: all of them, or none. Each
        limit is checked for all of them together (`headroom` times their sum free after them)."""
        if usd < 0 or tokens < 0:
            raise CharterError(BAD_REQUEST, "amounts cannot be negative", "amount")
        if count < 1:
            raise CharterError(BAD_REQUEST, "count must be at least 1", "count")
        check_on_expiry(on_expiry)
        now = _now() if now is None else now
        rids = [f"res_{ULID()}" for _ in range(count)]
        alerts: list[dict[str, Any]] = []
        with self._txn() as db:
            _, booked = self._sweep(db, now)
            charges = []
            for lim in limits:
                each = usd if lim.unit == "usd" else tokens
                amount = each * count
                key = period_key(lim.period, now, self.tz)
                row = db.execute(
                    "SELECT reserved, committed, alerted FROM budget_usage WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                    (lim.scope, lim.unit, lim.period, key),
                ).fetchone()
                reserved, committed, alerted = row if row else (0, 0, 0)
                left = lim.hard - reserved - committed
                if amount and amount * (1 + headroom) > left:  # asking nothing always fits, even under a lowered limit
                    raise CharterError(
                        BUDGET_EXCEEDED,
                        f"{lim.scope} {lim.period} {lim.unit} budget: asked {describe(lim.unit, amount)}, "
                        f"{describe(lim.unit, max(left, 0))} left of {describe(lim.unit, lim.hard)}",
                        f"budget:{lim.scope}:{lim.unit}:{lim.period}",
                    ).with_details({"scope": lim.scope, "unit": lim.unit, "period": lim.period,
                                    "period_key": key, "asked": amount, "left": max(left, 0),
                                    "hard": lim.hard, "committed": committed, "reserved": reserved})
                if amount == 0:
                    # Nothing held, but the limit is recorded: the real use is booked on it at settle.
                    charges.append((lim.scope, lim.unit, lim.period, key, 0, lim.hard))
                    continue
                if not row:
                    db.execute("INSERT INTO budget_usage VALUES (?,?,?,?,0,0,0)", (lim.scope, lim.unit, lim.period, key))
                db.execute(
                    "UPDATE budget_usage SET reserved = reserved + ? WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                    (amount, lim.scope, lim.unit, lim.period, key),
                )
                charges.append((lim.scope, lim.unit, lim.period, key, each, lim.hard))
                used = reserved + committed + amount
                if not alerted and lim.hard and used >= lim.soft_ratio * lim.hard:
                    if headroom:
                        raise CharterError(BUDGET_EXCEEDED, f"{lim.scope} {lim.period} {lim.unit} budget: "
                                           "a reservation made ahead would raise its soft alert",
                                           f"budget:{lim.scope}:{lim.unit}:{lim.period}")
                    db.execute(
                        "UPDATE budget_usage SET alerted = 1 WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                        (lim.scope, lim.unit, lim.period, key),
                    )
                    alerts.append({"kind": "soft", "scope": lim.scope, "unit": lim.unit, "period": lim.period, "period_key": key,
                                   "used": used, "hard": lim.hard, "soft_ratio": lim.soft_ratio})
            expires = now + int(ttl_s * 1000)
            held = orjson.dumps(charges).decode()
            db.executemany(
                "INSERT INTO reservations (id, agent_id, role, model, action, usd, tokens, charges, state, "
                "created_at, expires_at, on_expiry) VALUES (?,?,?,?,?,?,?,?,'held',?,?,?)",
                [(rid, agent_id, role, model, action, usd, tokens, held, now, expires, on_expiry) for rid in rids],
            )
        report_booked(booked)
        # A soft alert is raised once, on the first: it is about the limit, not about each of them.
        return [Reservation(rid, usd, tokens, expires, tuple(alerts) if i == 0 else ()) for i, rid in enumerate(rids)]

    def settle(self, reservation_id: str, *, usd: int, tokens_in: int, tokens_out: int,
               agent_id: str | None = None, now: int | None = None) -> Settlement:
        """Book the actual use and release the rest of the reservation.

        The real amount is booked even when it is more than was reserved (see the module doc):
        the settlement is then an overrun, with an alert naming each limit it pushed over.
        """
        now = _now() if now is None else now
        with self._txn() as db:
            return self._settle(db, reservation_id, usd, tokens_in, tokens_out, agent_id, now)

    def settle_batch(self, items: Sequence[SettleItem], now: int | None = None) -> list[Settlement | Exception]:
        """Settle many reservations in one transaction (one COMMIT), each on its own: one that
        cannot be settled (unknown, settled already, an amount SQLite cannot hold, a statement that
        failed) is rolled back alone and returned as its exception; the others are booked."""
        now = _now() if now is None else now
        with self._txn() as db:
            plain = self._settle_plain(db, items, now) if len(items) > 1 else None
            if plain is not None:
                return plain
            return _each_alone(db, items, lambda item: self._settle(
                db, item.reservation_id, item.usd, item.tokens_in, item.tokens_out, item.agent_id, now))

    def _settle_plain(self, db: Any, items: Sequence[SettleItem], now: int) -> list[Settlement | Exception] | None:
        """`settle_batch` for the usual batch, in a few statements rather than a few per item: every
        reservation held, its owner's, and each settled within what it holds (no overrun, so no cap
        can have been crossed). Their usage rows are updated once each, with the batch's sums. None
        for any other batch (or one that fails here): the caller settles it item by item, which
        gives the same books."""
        try:
            return self._settle_plain_unguarded(db, items, now)
        except Exception:  # noqa: BLE001 - a value that is not what it should be: each on its own decides
            return None

    def _settle_plain_unguarded(self, db: Any, items: Sequence[SettleItem],
                                now: int) -> list[Settlement | Exception] | None:
        ids = [item.reservation_id for item in items]
        if len(set(ids)) != len(ids) or len(ids) > PLAIN_BATCH_MAX:
            return None
        rows = {r[0]: r for r in db.execute(
            f"SELECT id, agent_id, role, model, usd, tokens, charges, state FROM reservations WHERE id IN "
            f"({','.join('?' * len(ids))})", ids)}
        sums: dict[tuple[str, str, str, str], list[int]] = {}
        closed: list[tuple[int, str]] = []
        spent: list[tuple[Any, ...]] = []
        out: list[Settlement | Exception] = []
        day = period_key("day", now, self.tz)
        for item in items:
            row = rows.get(item.reservation_id)
            if row is None or row[7] != "held" or (item.agent_id is not None and row[1] != item.agent_id):
                return None
            tokens = item.tokens_in + item.tokens_out
            if min(item.usd, item.tokens_in, item.tokens_out) < 0 or item.usd > row[4] or tokens > row[5]:
                return None
            for scope, unit, period, key, held, _hard in _charges(row[6]):
                actual = item.usd if unit == "usd" else tokens
                if actual > held:  # within the reservation but beyond one charge: the ordinary path decides
                    return None
                if held:
                    total = sums.setdefault((scope, unit, period, key), [0, 0])
                    total[0] += held
                    total[1] += actual
            closed.append((now, item.reservation_id))
            spent.append((item.reservation_id, row[1], row[2], row[3], item.usd, item.tokens_in, item.tokens_out,
                          now, day))
            out.append(Settlement(item.reservation_id, item.usd, tokens, False, False, []))
        db.execute("SAVEPOINT plain")
        try:
            db.executemany("UPDATE budget_usage SET reserved = reserved - ?, committed = committed + ? "
                           "WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                           [(held, actual, *where) for where, (held, actual) in sums.items()])
            db.executemany("UPDATE reservations SET state = 'settled', closed_at = ? WHERE id = ?", closed)
            db.executemany("INSERT INTO spend (reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, "
                           "day, overrun) VALUES (?,?,?,?,?,?,?,?,?,0)", spent)
        except Exception:  # noqa: BLE001 - e.g. an amount SQLite cannot hold: item by item, each on its own
            db.execute("ROLLBACK TO plain")
            db.execute("RELEASE plain")
            return None
        db.execute("RELEASE plain")
        return out

    def _settle(self, db: Any, reservation_id: str, usd: int, tokens_in: int, tokens_out: int,
                agent_id: str | None, now: int) -> Settlement:
        if usd < 0 or tokens_in < 0 or tokens_out < 0:
            raise CharterError(BAD_REQUEST, "amounts cannot be negative", "amount")
        tokens = tokens_in + tokens_out
        row = db.execute(
            "SELECT agent_id, role, model, usd, tokens, charges, state FROM reservations WHERE id = ?",
            (reservation_id,),
        ).fetchone()
        if row is None or (agent_id is not None and row[0] != agent_id):
            raise CharterError(NOT_FOUND, f"no reservation {reservation_id!r}", "reservation_id")
        owner, role, model, r_usd, r_tokens, charges, state = row
        if state in ("settled", "released"):
            raise CharterError(CONFLICT, f"reservation {reservation_id} is already {state}", "reservation_id")
        late = state == "expired"  # swept already: what it held is back in the budget
        crossed: list[dict[str, Any]] = []
        for scope, unit, period, key, amount, hard_then in _charges(charges):
            actual = usd if unit == "usd" else tokens
            held = 0 if late else amount
            where = (scope, unit, period, key)
            if held == 0:
                if actual == 0:
                    continue
                db.execute("INSERT OR IGNORE INTO budget_usage VALUES (?,?,?,?,0,0,0)", where)
            db.execute(
                "UPDATE budget_usage SET reserved = reserved - ?, committed = committed + ? "
                "WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                (held, actual, *where),
            )
            if actual > held:  # this booking grew the period's use: did it cross the cap?
                reserved, committed = db.execute(
                    "SELECT reserved, committed FROM budget_usage "
                    "WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?", where,
                ).fetchone()
                hard = db.execute(
                    "SELECT hard FROM budget_limits WHERE scope = ? AND unit = ? AND period = ?", (scope, unit, period)
                ).fetchone()
                # A limit that is not in budget_limits (an agent's default from its charter) is
                # capped by the hard it had when the reservation was taken.
                cap = hard[0] if hard else hard_then
                if cap is not None and reserved + committed > cap:
                    crossed.append(_crossed(scope, unit, period, key, reserved + committed, cap))
        overrun = usd > r_usd or tokens > r_tokens or bool(crossed)
        db.execute("UPDATE reservations SET state = 'settled', closed_at = ? WHERE id = ?", (now, reservation_id))
        db.execute(
            "INSERT INTO spend (reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, overrun) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (reservation_id, owner, role, model, usd, tokens_in, tokens_out, now,
             period_key("day", now, self.tz), int(overrun)),
        )
        alerts = [overrun_alert(reservation_id, model, r_usd, r_tokens, usd, tokens, late, crossed)] if overrun else []
        return Settlement(reservation_id, usd, tokens, overrun, late, alerts)

    def release(self, reservation_id: str, *, agent_id: str | None = None, now: int | None = None) -> None:
        now = _now() if now is None else now
        with self._txn() as db:
            self._release(db, reservation_id, agent_id, now)

    def release_batch(self, reservation_ids: Sequence[str], now: int | None = None) -> list[Exception | None]:
        """Release many reservations in one transaction, each on its own, as `settle_batch` settles:
        None for each released, or the exception that kept it held (unknown, closed already)."""
        now = _now() if now is None else now
        with self._txn() as db:
            return _each_alone(db, reservation_ids, lambda rid: self._release(db, rid, None, now))

    def _release(self, db: Any, reservation_id: str, agent_id: str | None, now: int) -> None:
        row = db.execute("SELECT agent_id, charges, state FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
        if row is None or (agent_id is not None and row[0] != agent_id):
            raise CharterError(NOT_FOUND, f"no reservation {reservation_id!r}", "reservation_id")
        if row[2] != "held":
            raise CharterError(CONFLICT, f"reservation {reservation_id} is already {row[2]}", "reservation_id")
        _unhold(db, row[1])
        db.execute("UPDATE reservations SET state = 'released', closed_at = ? WHERE id = ?", (now, reservation_id))

    def sweep(self, now: int | None = None) -> int:
        with self._txn() as db:
            swept, booked = self._sweep(db, _now() if now is None else now)
        report_booked(booked)
        return swept

    # -- reading ---------------------------------------------------------------------------

    def reservation_model(self, reservation_id: str) -> str:
        row = self._db.execute("SELECT model FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
        return row[0] if row else ""

    def usage(self, limits: list[Limit], now: int | None = None) -> list[dict[str, Any]]:
        now = _now() if now is None else now
        out = []
        for lim in limits:
            key = period_key(lim.period, now, self.tz)
            row = self._db.execute(
                "SELECT reserved, committed FROM budget_usage WHERE scope = ? AND unit = ? AND period = ? AND period_key = ?",
                (lim.scope, lim.unit, lim.period, key),
            ).fetchone()
            reserved, committed = row if row else (0, 0)
            out.append({**lim.to_dict(), "period_key": key, "reserved": reserved, "committed": committed,
                        "left": max(lim.hard - reserved - committed, 0),
                        "over": max(reserved + committed - lim.hard, 0)})
        return out

    def history(self, *, by: str = "day", since_ms: int = 0, agent_id: str | None = None) -> list[dict[str, Any]]:
        column = {"day": "day", "agent": "agent_id", "model": "model", "role": "role"}.get(by)
        if column is None:
            raise CharterError(BAD_REQUEST, "group by day, agent, model or role", "by")
        where, args = "ts >= ?", [since_ms]
        if agent_id:
            where += " AND agent_id = ?"
            args.append(agent_id)
        rows = self._db.execute(
            f"SELECT {column}, COUNT(*), SUM(usd), SUM(tokens_in), SUM(tokens_out), SUM(overrun) FROM spend "
            f"WHERE {where} GROUP BY {column} ORDER BY {column}", args,
        ).fetchall()
        return [{by: r[0], "calls": r[1], "usd_micros": r[2], "tokens_in": r[3], "tokens_out": r[4], "overruns": r[5]}
                for r in rows]

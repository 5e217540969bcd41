"""The budget ledger on PostgreSQL (`[store] backend = "postgres"`): exact across daemons and machines.

Same tables, same semantics and the same methods as the SQLite `Ledger`. Exactness comes from row
locks instead of a file lock: a reservation locks the usage row of every limit it touches with
`SELECT ... FOR UPDATE` (rows created first with `INSERT ... ON CONFLICT DO NOTHING`), always in the
same sorted order, checks every limit against `committed + reserved`, and takes its share of all of
them or none, in one transaction. Another reservation on any of those rows waits for the COMMIT and
then reads the new totals, so N daemons can never spend N times the cap. Settling locks its
reservation row first, then the usage rows in the same order. Every reservation first sweeps the
expired ones back (its own transaction); a sweep waits for expired reservations that another
transaction is sweeping or settling at that moment instead of skipping them, so that no
reservation is refused money that is on its way back (as with SQLite, where the sweep runs inside
the reservation's transaction). A deadlock or serialization failure (which that ordering should
never produce) is retried. Settling books the real use, an overrun included, exactly as the SQLite
ledger does (see charter.budget.ledger).

Connections: a small pool per process (default 4), shared by threads. `remote` tells the daemon's
callers on the event loop to ask from worker threads (`Governance.admit_spend_async`, the deferred
settlements), so that a round trip, or a row lock held by another daemon, never stalls the loop.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from ulid import ULID

from charter.budget.ledger import (
    BUDGET_EXCEEDED,
    SWEEP_BATCH,
    Booked,
    Limit,
    Reservation,
    SettleItem,
    Settlement,
    _charges,
    _crossed,
    check_on_expiry,
    describe,
    overrun_alert,
    report_booked,
    validate_limit,
)
from charter.budget.periods import period_key
from charter.budget.threads import ledger_closed
from charter.errors import BAD_REQUEST, CONFLICT, NOT_FOUND, CharterError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_limits (
    scope      TEXT NOT NULL,
    unit       TEXT NOT NULL CHECK (unit IN ('usd', 'tokens')),
    period     TEXT NOT NULL CHECK (period IN ('hour', 'day', 'month', 'total')),
    hard       BIGINT NOT NULL CHECK (hard >= 0),
    soft_ratio DOUBLE PRECISION NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (scope, unit, period)
);
CREATE TABLE IF NOT EXISTS budget_usage (
    scope      TEXT NOT NULL,
    unit       TEXT NOT NULL,
    period     TEXT NOT NULL,
    period_key TEXT NOT NULL,
    reserved   BIGINT NOT NULL DEFAULT 0,
    committed  BIGINT NOT NULL DEFAULT 0,
    alerted    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, unit, period, period_key)
);
CREATE TABLE IF NOT EXISTS reservations (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    role        TEXT NOT NULL,
    model       TEXT NOT NULL,
    action      TEXT NOT NULL,
    usd         BIGINT NOT NULL,
    tokens      BIGINT NOT NULL,
    charges     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    closed_at   BIGINT,
    n           BIGSERIAL,
    on_expiry   TEXT NOT NULL DEFAULT 'release'
);
CREATE INDEX IF NOT EXISTS reservations_held ON reservations (state, expires_at);
CREATE TABLE IF NOT EXISTS spend (
    id             BIGSERIAL PRIMARY KEY,
    reservation_id TEXT NOT NULL,
    agent_id       TEXT NOT NULL,
    role           TEXT NOT NULL,
    model          TEXT NOT NULL,
    usd            BIGINT NOT NULL,
    tokens_in      BIGINT NOT NULL,
    tokens_out     BIGINT NOT NULL,
    ts             BIGINT NOT NULL,
    day            TEXT NOT NULL,
    overrun        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spend_ts ON spend (ts);
"""
_KEY = "scope = %s AND unit = %s AND period = %s AND period_key = %s"


def _add_on_expiry(conn: Any) -> None:
    """Tables from before `on_expiry`: add the column. Looked up first: an ALTER takes an exclusive
    lock on the table even when the column exists, and would wait for (or deadlock with) another
    daemon's settlement at every start."""
    found = conn.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                         "AND table_name = 'reservations' AND column_name = 'on_expiry'").fetchone()
    if found is None:
        conn.execute("ALTER TABLE reservations ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'release'")


def _now() -> int:
    return time.time_ns() // 1_000_000


class PgLedger:
    """`Ledger` on PostgreSQL. `dsn` is a libpq connection string (`host=... dbname=... user=...`)."""

    remote = True  # across the network: asked from worker threads by callers on the event loop

    def __init__(self, dsn: str, *, timezone: str = "UTC", pool_size: int = 4, create: bool = True) -> None:
        import psycopg

        self.dsn = dsn
        self.tz = ZoneInfo(timezone)
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._size = pool_size
        self._opening = 0  # connections being opened, outside the lock
        self._closed = False
        self._psycopg = psycopg
        if create:
            with self._conn() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(7477001)")  # two daemons creating the schema at once
                conn.execute(SCHEMA)
                _add_on_expiry(conn)

    def close(self) -> None:
        """Close every connection, those in use included (the daemon waits for its ledger calls
        first: `LedgerThreads.close`). Any call after this fails with a clear error."""
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass

    def _refuse_closed(self) -> None:
        if self._closed:
            raise ledger_closed()

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        self._refuse_closed()
        conn = self._take()
        try:
            yield conn
        finally:
            with self._lock:
                if conn.closed or self._closed:  # broken, or the ledger closed under this call
                    if conn in self._all:
                        self._all.remove(conn)
                    conn.close()
                else:
                    self._pool.put(conn)

    def _take(self) -> Any:
        """A pooled connection, a new one while the pool is below its size, or else the next one
        given back. Connecting happens outside the lock: a slow connect holds up no one else."""
        wait = 0.0
        while True:
            try:
                conn = self._pool.get(timeout=wait) if wait else self._pool.get_nowait()
            except queue.Empty:
                conn = None
            self._refuse_closed()  # (closed meanwhile: a connection taken now is being closed)
            if conn is not None:
                return conn
            with self._lock:
                grow = len(self._all) + self._opening < self._size  # (a broken one dropped frees a place)
                if grow:
                    self._opening += 1
            if grow:
                return self._connect()
            wait = 0.2

    def _connect(self) -> Any:
        """Open the connection a place was kept for (`_opening`), and take that place."""
        try:
            conn = self._psycopg.connect(self.dsn, autocommit=True)
        except BaseException:
            with self._lock:
                self._opening -= 1
            raise
        with self._lock:
            self._opening -= 1
            if not self._closed:
                self._all.append(conn)
                return conn
        conn.close()
        raise ledger_closed()

    def _run(self, body: Callable[[Any], T]) -> T:
        """`body(conn)` in one transaction; retried on a deadlock or a serialization failure."""
        errors = self._psycopg.errors
        for attempt in range(20):
            with self._conn() as conn:
                try:
                    with conn.transaction():
                        return body(conn)
                except (errors.DeadlockDetected, errors.SerializationFailure):
                    time.sleep(0.001 * (attempt + 1))
        raise CharterError(CONFLICT, "the ledger stayed contended; try again", "budget")

    @contextmanager
    def _txn(self) -> Iterator[Any]:
        """A transaction on a pooled connection (tests use it to die inside one)."""
        with self._conn() as conn, conn.transaction():
            yield conn

    # -- limits ----------------------------------------------------------------------------

    def set_limit(self, limit: Limit) -> None:
        validate_limit(limit)
        self._run(lambda c: c.execute(
            "INSERT INTO budget_limits VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (scope, unit, period) DO UPDATE SET "
            "hard = excluded.hard, soft_ratio = excluded.soft_ratio, updated_at = excluded.updated_at",
            (limit.scope, limit.unit, limit.period, limit.hard, limit.soft_ratio, _now())))

    def remove_limit(self, scope: str, unit: str, period: str) -> None:
        validate_limit(Limit(scope, unit, period, 0))

        def body(c: Any) -> None:
            cur = c.execute("DELETE FROM budget_limits WHERE scope = %s AND unit = %s AND period = %s",
                            (scope, unit, period))
            if cur.rowcount == 0:
                raise CharterError(NOT_FOUND, f"no {period} {unit} limit for {scope}", "budget")
        self._run(body)

    def limits(self, scopes: list[str] | None = None) -> list[Limit]:
        with self._conn() as c:
            if scopes is None:
                rows = c.execute("SELECT scope, unit, period, hard, soft_ratio FROM budget_limits").fetchall()
            else:
                rows = c.execute("SELECT scope, unit, period, hard, soft_ratio FROM budget_limits "
                                 "WHERE scope = ANY(%s)", (scopes,)).fetchall()
        return [Limit(*r) for r in rows]

    def applicable(self, agent_id: str, role: str, defaults: list[Limit]) -> list[Limit]:
        found = self.limits(["global", f"role:{role}", f"agent:{agent_id}"])
        explicit = {(lim.unit, lim.period) for lim in found if lim.scope == f"agent:{agent_id}"}
        return found + [d for d in defaults if (d.unit, d.period) not in explicit]

    # -- locking ---------------------------------------------------------------------------

    @staticmethod
    def _lock_rows(c: Any, keys: list[tuple[str, str, str, str]]) -> dict[tuple[str, str, str, str], tuple[int, int, int]]:
        """Create (if missing) and lock usage rows in one global order; their (reserved, committed, alerted)."""
        out = {}
        for key in sorted(set(keys)):
            c.execute("INSERT INTO budget_usage VALUES (%s,%s,%s,%s,0,0,0) ON CONFLICT DO NOTHING", key)
            out[key] = c.execute(f"SELECT reserved, committed, alerted FROM budget_usage WHERE {_KEY} FOR UPDATE",
                                 key).fetchone()
        return out

    def _sweep(self, c: Any, now: int) -> tuple[int, list[Booked]]:
        """One batch of expired reservations closed: how many, and those booked. Each gives its money
        back, or, with `on_expiry = 'book'`, is booked at its full amount (see charter.budget.ledger)."""
        # FOR UPDATE, not SKIP LOCKED: a reservation that another transaction is sweeping (or settling)
        # right now is waited for, so no reserve goes on to count money that is on its way back.
        rows = c.execute("SELECT id, charges, on_expiry, agent_id, role, model, usd, tokens, created_at "
                         "FROM reservations WHERE state = 'held' AND expires_at <= %s ORDER BY id LIMIT %s FOR UPDATE",
                         (now, SWEEP_BATCH)).fetchall()
        if not rows:
            return 0, []
        booked = []
        charges = [(row, _charges(row[1])) for row in rows]
        self._lock_rows(c, [(s, u, p, k) for _, ch in charges for s, u, p, k, a, _ in ch if a])
        for (rid, _, on_expiry, agent_id, role, model, usd, tokens, created_at), ch in charges:
            book = on_expiry == "book"
            for scope, unit, period, key, amount, _ in ch:
                if amount:
                    c.execute(f"UPDATE budget_usage SET reserved = reserved - %s, committed = committed + %s "
                              f"WHERE {_KEY}", (amount, amount if book else 0, scope, unit, period, key))
            c.execute("UPDATE reservations SET state = %s, closed_at = %s WHERE id = %s",
                      ("settled" if book else "expired", now, rid))
            if not book:
                continue
            c.execute("INSERT INTO spend (reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, "
                      "overrun) VALUES (%s,%s,%s,%s,%s,%s,0,%s,%s,0)",
                      (rid, agent_id, role, model, usd, tokens, created_at, period_key("day", created_at, self.tz)))
            booked.append(Booked(rid, agent_id, model, usd, tokens))
        return len(rows), booked

    def sweep(self, now: int | None = None) -> int:
        """Every expired reservation back, batch by batch until none is left (each batch commits on its
        own, so a large leak does not hold the usage rows' locks for the whole sweep)."""
        now = _now() if now is None else now
        total = 0
        while True:
            n, booked = self._run(lambda c: self._sweep(c, now))
            report_booked(booked)  # committed: a retried transaction reports once
            total += n
            if n < SWEEP_BATCH:
                return total

    # -- reserve, settle, release ----------------------------------------------------------

    def reserve(self, *, agent_id: str, role: str, usd: int, tokens: int, limits: list[Limit],
                model: str = "", action: str = "model.call", ttl_s: float = 600.0, on_expiry: str = "release",
                now: int | None = None) -> Reservation:
        if usd < 0 or tokens < 0:
            raise CharterError(BAD_REQUEST, "amounts cannot be negative", "amount")
        check_on_expiry(on_expiry)
        now = _now() if now is None else now
        self.sweep(now)  # expired reservations go back first (their own transaction, their own locks)
        rid = f"res_{ULID()}"
        keyed = [(lim, (lim.scope, lim.unit, lim.period, period_key(lim.period, now, self.tz))) for lim in limits]

        def body(c: Any) -> Reservation:
            rows = self._lock_rows(c, [k for lim, k in keyed if (usd if lim.unit == "usd" else tokens)])
            alerts: list[dict[str, Any]] = []
            charges = []
            taken: dict[tuple[str, str, str, str], int] = {}
            for lim, key in keyed:  # in the caller's order, as the SQLite ledger: the first that fails is named
                amount = usd if lim.unit == "usd" else tokens
                reserved, committed, alerted = rows.get(key, (0, 0, 0))
                reserved += taken.get(key, 0)
                left = lim.hard - reserved - committed
                if amount and amount > left:
                    raise CharterError(
                        BUDGET_EXCEEDED,
                        f"{lim.scope} {lim.period} {lim.unit} budget: asked {describe(lim.unit, amount)}, "
                        f"{describe(lim.unit, max(left, 0))} left of {describe(lim.unit, lim.hard)}",
                        f"budget:{lim.scope}:{lim.unit}:{lim.period}",
                    ).with_details({"scope": lim.scope, "unit": lim.unit, "period": lim.period,
                                    "period_key": key[3], "asked": amount, "left": max(left, 0),
                                    "hard": lim.hard, "committed": committed, "reserved": reserved})
                if amount == 0:
                    charges.append((*key, 0, lim.hard))  # nothing held; the real use is booked here at settle
                    continue
                c.execute(f"UPDATE budget_usage SET reserved = reserved + %s WHERE {_KEY}", (amount, *key))
                taken[key] = taken.get(key, 0) + amount
                charges.append((*key, amount, lim.hard))
                used = reserved + committed + amount
                if not alerted and lim.hard and used >= lim.soft_ratio * lim.hard:
                    c.execute(f"UPDATE budget_usage SET alerted = 1 WHERE {_KEY}", key)
                    rows[key] = (rows[key][0], rows[key][1], 1)
                    alerts.append({"kind": "soft", "scope": lim.scope, "unit": lim.unit, "period": lim.period, "period_key": key[3],
                                   "used": used, "hard": lim.hard, "soft_ratio": lim.soft_ratio})
            expires = now + int(ttl_s * 1000)
            c.execute("INSERT INTO reservations (id, agent_id, role, model, action, usd, tokens, charges, state, "
                      "created_at, expires_at, on_expiry) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,'held',%s,%s,%s)",
                      (rid, agent_id, role, model, action, usd, tokens, json.dumps(charges), now, expires, on_expiry))
            return Reservation(rid, usd, tokens, expires, tuple(alerts))

        return self._run(body)

    def settle(self, reservation_id: str, *, usd: int, tokens_in: int, tokens_out: int,
               agent_id: str | None = None, now: int | None = None) -> Settlement:
        """Book the actual use (even beyond the reservation: an overrun, with its alert); release the rest."""
        if usd < 0 or tokens_in < 0 or tokens_out < 0:
            raise CharterError(BAD_REQUEST, "amounts cannot be negative", "amount")
        now = _now() if now is None else now
        tokens = tokens_in + tokens_out

        def body(c: Any) -> Settlement:
            row = c.execute("SELECT agent_id, role, model, usd, tokens, charges, state FROM reservations "
                            "WHERE id = %s FOR UPDATE", (reservation_id,)).fetchone()
            if row is None or (agent_id is not None and row[0] != agent_id):
                raise CharterError(NOT_FOUND, f"no reservation {reservation_id!r}", "reservation_id")
            owner, role, model, r_usd, r_tokens, charges_text, state = row
            if state in ("settled", "released"):
                raise CharterError(CONFLICT, f"reservation {reservation_id} is already {state}", "reservation_id")
            late = state == "expired"  # swept already: what it held is back in the budget
            charges = _charges(charges_text)
            touched = [(s, u, p, k) for s, u, p, k, amount, _ in charges
                       if (0 if late else amount) or (usd if u == "usd" else tokens)]
            locked = self._lock_rows(c, touched)
            crossed: list[dict[str, Any]] = []
            for scope, unit, period, key, amount, hard_then in charges:
                actual = usd if unit == "usd" else tokens
                held = 0 if late else amount
                k = (scope, unit, period, key)
                if held == 0 and actual == 0:
                    continue
                c.execute(f"UPDATE budget_usage SET reserved = reserved - %s, committed = committed + %s "
                          f"WHERE {_KEY}", (held, actual, *k))
                reserved, committed, alerted = locked[k]
                reserved, committed = reserved - held, committed + actual
                locked[k] = (reserved, committed, alerted)
                if actual > held:  # this booking grew the period's use: did it cross the cap?
                    hard = c.execute("SELECT hard FROM budget_limits WHERE scope = %s AND unit = %s AND period = %s",
                                     (scope, unit, period)).fetchone()
                    cap = hard[0] if hard else hard_then
                    if cap is not None and reserved + committed > cap:
                        crossed.append(_crossed(scope, unit, period, key, reserved + committed, cap))
            overrun = usd > r_usd or tokens > r_tokens or bool(crossed)
            c.execute("UPDATE reservations SET state = 'settled', closed_at = %s WHERE id = %s", (now, reservation_id))
            c.execute("INSERT INTO spend (reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, "
                      "overrun) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                      (reservation_id, owner, role, model, usd, tokens_in, tokens_out, now,
                       period_key("day", now, self.tz), int(overrun)))
            alerts = [overrun_alert(reservation_id, model, r_usd, r_tokens, usd, tokens, late, crossed)] if overrun else []
            return Settlement(reservation_id, usd, tokens, overrun, late, alerts)

        return self._run(body)

    def settle_batch(self, items: Sequence[SettleItem], now: int | None = None) -> list[Settlement | Exception]:
        """`settle` for each, in its own transaction; one that cannot be settled (whatever the
        reason, a database error included) is returned as its exception and the rest go on."""
        out: list[Settlement | Exception] = []
        for item in items:
            try:
                out.append(self.settle(item.reservation_id, usd=item.usd, tokens_in=item.tokens_in,
                                       tokens_out=item.tokens_out, agent_id=item.agent_id, now=now))
            except Exception as exc:  # noqa: BLE001 - this item's failure, reported as such
                out.append(exc)
        return out

    def release(self, reservation_id: str, *, agent_id: str | None = None, now: int | None = None) -> None:
        now = _now() if now is None else now

        def body(c: Any) -> None:
            row = c.execute("SELECT agent_id, charges, state FROM reservations WHERE id = %s FOR UPDATE",
                            (reservation_id,)).fetchone()
            if row is None or (agent_id is not None and row[0] != agent_id):
                raise CharterError(NOT_FOUND, f"no reservation {reservation_id!r}", "reservation_id")
            if row[2] != "held":
                raise CharterError(CONFLICT, f"reservation {reservation_id} is already {row[2]}", "reservation_id")
            charges = [ch for ch in _charges(row[1]) if ch[4]]  # only what was held goes back
            self._lock_rows(c, [(s, u, p, k) for s, u, p, k, _, _ in charges])
            for scope, unit, period, key, amount, _ in charges:
                c.execute(f"UPDATE budget_usage SET reserved = reserved - %s WHERE {_KEY}",
                          (amount, scope, unit, period, key))
            c.execute("UPDATE reservations SET state = 'released', closed_at = %s WHERE id = %s", (now, reservation_id))

        self._run(body)

    # -- reading ---------------------------------------------------------------------------

    def reservation_model(self, reservation_id: str) -> str:
        with self._conn() as c:
            row = c.execute("SELECT model FROM reservations WHERE id = %s", (reservation_id,)).fetchone()
        return row[0] if row else ""

    def usage(self, limits: list[Limit], now: int | None = None) -> list[dict[str, Any]]:
        now = _now() if now is None else now
        out = []
        with self._conn() as c:
            for lim in limits:
                key = period_key(lim.period, now, self.tz)
                row = c.execute(f"SELECT reserved, committed FROM budget_usage WHERE {_KEY}",
                                (lim.scope, lim.unit, lim.period, key)).fetchone()
                reserved, committed = row if row else (0, 0)
                out.append({**lim.to_dict(), "period_key": key, "reserved": reserved, "committed": committed,
                            "left": max(lim.hard - reserved - committed, 0),
                            "over": max(reserved + committed - lim.hard, 0)})
        return out

    def history(self, *, by: str = "day", since_ms: int = 0, agent_id: str | None = None) -> list[dict[str, Any]]:
        column = {"day": "day", "agent": "agent_id", "model": "model", "role": "role"}.get(by)
        if column is None:
            raise CharterError(BAD_REQUEST, "group by day, agent, model or role", "by")
        where, args = "ts >= %s", [since_ms]
        if agent_id:
            where += " AND agent_id = %s"
            args.append(agent_id)
        with self._conn() as c:
            rows = c.execute(
                f"SELECT {column}, COUNT(*), SUM(usd), SUM(tokens_in), SUM(tokens_out), SUM(overrun) FROM spend "
                f"WHERE {where} GROUP BY {column} ORDER BY {column}", args).fetchall()
        return [{by: r[0], "calls": r[1], "usd_micros": int(r[2] or 0), "tokens_in": int(r[3] or 0),
                 "tokens_out": int(r[4] or 0), "overruns": int(r[5] or 0)} for r in rows]

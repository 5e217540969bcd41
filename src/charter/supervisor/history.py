"""History and uptime per service, in charter.db next to the log.

`service_status` is the current state of each service (so a daemon restart does not forget it);
`service_history` holds every state change, restart and alert for good, and every check result for
`history_retention`. Uptime over a window is the share of that window spent `passing`, computed from
the state changes (time before the first record does not count).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from charter.db import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS service_status (
    label        TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    status       TEXT NOT NULL,
    since        REAL NOT NULL,
    last_checked REAL,
    detail       TEXT NOT NULL DEFAULT '',
    checks       INTEGER NOT NULL DEFAULT 0,
    checks_ok    INTEGER NOT NULL DEFAULT 0,
    restarts     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS service_history (
    id      INTEGER PRIMARY KEY,
    label   TEXT NOT NULL,
    ts      REAL NOT NULL,
    kind    TEXT NOT NULL,          -- state | check | restart | alert
    state   TEXT,
    status  TEXT,
    detail  TEXT NOT NULL DEFAULT '',
    run_id  TEXT,
    ms      REAL
);
CREATE INDEX IF NOT EXISTS service_history_label_ts ON service_history (label, ts);
CREATE INDEX IF NOT EXISTS service_history_kind_ts ON service_history (kind, ts);
"""

UP = "passing"


class History:
    def __init__(self, db_path: Path, synchronous: str = "normal") -> None:
        self._db = connect(db_path, synchronous=synchronous)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            cur = self._db.execute("SELECT label, state, status, since, last_checked, detail, checks, checks_ok, restarts "
                                   "FROM service_status")
            cols = [d[0] for d in cur.description]
            return {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}

    def write(self, status: list[tuple[Any, ...]], events: list[tuple[Any, ...]]) -> None:
        """One transaction: status rows (label, state, status, since, last_checked, detail, checks,
        checks_ok, restarts) and history rows (label, ts, kind, state, status, detail, run_id, ms)."""
        if not status and not events:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if status:
                    self._db.executemany(
                        "INSERT INTO service_status VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(label) DO UPDATE SET "
                        "state=excluded.state, status=excluded.status, since=excluded.since, "
                        "last_checked=excluded.last_checked, detail=excluded.detail, checks=excluded.checks, "
                        "checks_ok=excluded.checks_ok, restarts=excluded.restarts", status)
                if events:
                    self._db.executemany(
                        "INSERT INTO service_history (label, ts, kind, state, status, detail, run_id, ms) "
                        "VALUES (?,?,?,?,?,?,?,?)", events)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune(self, older_than: float) -> int:
        """Drop check results older than `older_than` (epoch seconds); state changes stay."""
        with self._lock:
            cur = self._db.execute("DELETE FROM service_history WHERE kind = 'check' AND ts < ?", (older_than,))
            return cur.rowcount

    def forget(self, label: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM service_status WHERE label = ?", (label,))

    def history(self, label: str, limit: int = 50, kinds: tuple[str, ...] = ("state", "restart", "alert", "check")
                ) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(kinds))
        with self._lock:
            cur = self._db.execute(
                f"SELECT ts, kind, state, status, detail, run_id, ms FROM service_history WHERE label = ? "
                f"AND kind IN ({marks}) ORDER BY ts DESC, id DESC LIMIT ?", (label, *kinds, limit))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def uptime(self, label: str, window: float, now: float | None = None) -> float | None:
        """Share of the last `window` seconds spent passing (None before anything was recorded)."""
        now = time.time() if now is None else now
        start = now - window
        with self._lock:
            before = self._db.execute(
                "SELECT ts, state FROM service_history WHERE label = ? AND kind = 'state' AND ts <= ? "
                "ORDER BY ts DESC, id DESC LIMIT 1", (label, start)).fetchone()
            rows = self._db.execute(
                "SELECT ts, state FROM service_history WHERE label = ? AND kind = 'state' AND ts > ? "
                "ORDER BY ts, id", (label, start)).fetchall()
        if before is None and not rows:
            return None
        t, state = (start, before[1]) if before else (rows[0][0], rows[0][1])
        observed = up = 0.0
        for ts, new in rows:
            span = max(ts - t, 0.0)
            observed += span
            up += span if state == UP else 0.0
            t, state = ts, new
        span = max(now - t, 0.0)
        observed += span
        up += span if state == UP else 0.0
        return round(up / observed, 6) if observed > 0 else (1.0 if state == UP else 0.0)

"""The budget ledger on PostgreSQL (`[store] backend = "postgres"`) passes the SQLite ledger's own tests.

The tests of tests/test_budget.py are run unchanged, with the ledger, the worker processes, the
monitor and the state reader pointed at PostgreSQL on 127.0.0.1:5432 (a schema of their own per
test): four OS processes with 250 reservations in flight each never cross the cap and never refuse
falsely; a process SIGKILLed inside a transaction loses its uncommitted write and its reservations
come back after their TTL; sweeps, late settles (booked in full, as overruns), lowered limits, all-or-nothing across limits.
Skipped without PostgreSQL; failed under CI=true.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

import test_budget as tb
from charter.budget.ledger import Limit

psycopg = pytest.importorskip("psycopg")

PG_WORKER = tb.WORKER.replace(
    "from charter.budget.ledger import Ledger\n", "from charter.budget.pg import PgLedger\n").replace(
    "ledger = Ledger(Path(db))\n", "ledger = PgLedger(db, pool_size=8)\n")
assert PG_WORKER != tb.WORKER and "PgLedger(db" in PG_WORKER


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    return pg_dsn


class PgWorker(tb.Worker):
    def __init__(self, db: Any, name: str, seed: int, logdir: Path) -> None:
        import subprocess
        import sys

        self.name = name
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", PG_WORKER, str(db), name, str(seed)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)


class PgMonitor(threading.Thread):
    """tests/test_budget.py's Monitor, reading PostgreSQL in one snapshot per sample."""

    def __init__(self, db: str, cap: int) -> None:
        super().__init__(daemon=True)
        self.db, self.cap = db, cap
        self.samples = self.max_used = self.max_spend = 0
        self.violations: list[tuple[str, int, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.db, autocommit=True) as conn:
            while not self.done.is_set():
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    rows = conn.execute("SELECT period_key, reserved, committed FROM budget_usage "
                                        "WHERE scope = 'global' AND unit = 'usd'").fetchall()
                    spend = conn.execute("SELECT day, COALESCE(SUM(usd), 0) FROM spend GROUP BY day").fetchall()
                for key, reserved, committed in rows:
                    self.max_used = max(self.max_used, reserved + committed)
                    if reserved + committed > self.cap or reserved < 0:
                        self.violations.append((key, reserved, committed, self.cap))
                for _day, total in spend:
                    self.max_spend = max(self.max_spend, total)
                    if total > self.cap:
                        self.violations.append(("spend", 0, total, self.cap))
                self.samples += 1
                time.sleep(0.002)

    finish = tb.Monitor.finish


def pg_fresh_ledger(dsn: str):
    def fresh(tmp_path: Path, cap: int = tb.CAP) -> str:
        from charter.budget.pg import PgLedger

        ledger = PgLedger(dsn)
        ledger.set_limit(Limit("global", "usd", "day", hard=cap))
        ledger.close()
        return dsn
    return fresh


def pg_state(db: str) -> dict[str, Any]:
    with psycopg.connect(db) as conn:
        def q(sql: str) -> list[tuple]:
            return conn.execute(sql).fetchall()

        rows = q("SELECT period_key, reserved, committed FROM budget_usage WHERE scope = 'global' AND unit = 'usd'")
        return {
            "keys": [r[0] for r in rows],
            "reserved": sum(r[1] for r in rows),
            "committed": sum(r[2] for r in rows),
            "spend": q("SELECT COALESCE(SUM(usd), 0) FROM spend")[0][0],
            "spend_by_agent": {a: int(s) for a, s in q("SELECT agent_id, SUM(usd) FROM spend GROUP BY agent_id")},
            "overruns": q("SELECT COUNT(*) FROM spend WHERE overrun = 1")[0][0],
            "states": dict(q("SELECT state, COUNT(*) FROM reservations GROUP BY state")),
            "interleavings": sum(1 for (x,), (y,) in pairwise(q("SELECT agent_id FROM reservations ORDER BY n"))
                                 if x != y),
            "held_by_agent": {a: int(s) for a, s in q(
                "SELECT agent_id, SUM(usd) FROM reservations WHERE state = 'held' GROUP BY agent_id")},
        }


@pytest.fixture
def on_postgres(dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point tests/test_budget.py's ledger, workers, monitor and state reader at PostgreSQL."""
    from charter.budget.pg import PgLedger

    monkeypatch.setattr(tb, "Ledger", lambda path, **kw: PgLedger(dsn, **kw))
    monkeypatch.setattr(tb, "Worker", PgWorker)
    monkeypatch.setattr(tb, "Monitor", PgMonitor)
    monkeypatch.setattr(tb, "fresh_ledger", pg_fresh_ledger(dsn))
    monkeypatch.setattr(tb, "db_state", pg_state)
    return dsn


@pytest.mark.slow
def test_four_processes_never_cross_the_cap_and_never_refuse_falsely(on_postgres: str, tmp_path: Path) -> None:
    tb.test_four_processes_never_cross_the_cap_and_never_refuse_falsely(tmp_path)


@pytest.mark.slow
def test_sigkill_mid_transaction_returns_the_held_money_after_the_ttl(on_postgres: str, tmp_path: Path) -> None:
    tb.test_sigkill_mid_transaction_returns_the_held_money_after_the_ttl(tmp_path)


def test_sweep_returns_expired_reservations(on_postgres: str, tmp_path: Path) -> None:
    tb.test_sweep_returns_expired_reservations(tmp_path)


def test_a_batch_settles_each_reservation_on_its_own(on_postgres: str, tmp_path: Path) -> None:
    tb.test_a_batch_settles_each_reservation_on_its_own(tmp_path)


@pytest.mark.parametrize("in_table", [True, False], ids=["operator-limit", "charter-default-limit"])
def test_a_late_settle_books_the_real_use_and_names_the_cap_it_crossed(on_postgres: str, tmp_path: Path,
                                                                       in_table: bool) -> None:
    tb.test_a_late_settle_books_the_real_use_and_names_the_cap_it_crossed(tmp_path, in_table)


def test_asking_nothing_fits_even_under_a_lowered_limit(on_postgres: str, tmp_path: Path) -> None:
    tb.test_asking_nothing_fits_even_under_a_lowered_limit(tmp_path)


def test_a_reservation_is_all_or_nothing_across_limits(on_postgres: str, tmp_path: Path) -> None:
    tb.test_a_reservation_is_all_or_nothing_across_limits(tmp_path)


def test_the_ledger_rolls_over_at_local_midnight(on_postgres: str, tmp_path: Path) -> None:
    tb.test_the_ledger_rolls_over_at_local_midnight(tmp_path)


def test_tables_from_before_on_expiry_get_the_column_and_keep_their_reservations(dsn: str) -> None:
    """As on SQLite: the column is added on opening, once; what was held still gives its money back."""
    import psycopg

    from charter.budget.pg import PgLedger

    lims = [Limit("global", "usd", "day", 1000)]
    ledger = PgLedger(dsn)
    ledger.reserve(agent_id="a", role="w", usd=600, tokens=0, limits=lims, ttl_s=1, now=tb.NOW)
    ledger.close()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE reservations DROP COLUMN on_expiry")  # as it was before the column
    ledger = PgLedger(dsn)
    try:
        assert ledger.sweep(now=tb.NOW + 1000) == 1
        assert ledger.usage(lims, now=tb.NOW)[0]["reserved"] == 0 and ledger.history() == []
        ledger.reserve(agent_id="a", role="w", usd=700, tokens=0, limits=lims, ttl_s=1, on_expiry="book",
                       now=tb.NOW + 1000)
        PgLedger(dsn).close()  # a later opening finds the column and changes nothing
        assert ledger.sweep(now=tb.NOW + 2000) == 1
        assert ledger.usage(lims, now=tb.NOW)[0]["committed"] == 700
    finally:
        ledger.close()

"""Budgets: the exact ledger across OS processes (and across a SIGKILL), then the daemon's budget API
through the SDK, then periods in a non-UTC zone.

The cross-process tests run worker scripts (`WORKER`, below) in subprocesses, each with its own
`Ledger` on the same SQLite file and 250 reservations in flight at once (an asyncio loop with the
ledger calls in a thread pool). A monitor thread in the test process reads `budget_usage` and the
`spend` table from a separate read-only connection the whole time: every committed state it sees
must be within the cap.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from charter.budget.ledger import BUDGET_EXCEEDED, Ledger, Limit, SettleItem
from charter.budget.periods import period_key
from charter.errors import CONFLICT, NOT_FOUND, CharterError
from charter.sdk import Agent
from charter.server.daemon import stop
from conftest import Daemon, make_home, start_daemon

CAP = 2_000_000  # $2 in micro-dollars: the global daily cap of the cross-process tests
LO, HI = 1, 20_000  # reservation sizes; 4 x 250 x ~$0.01 = ~$10 of demand, five times the cap
PER_PROCESS = 250

# -- the worker process ------------------------------------------------------------------------

WORKER = r'''
import asyncio, json, random, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from charter.budget.ledger import Ledger
from charter.errors import CharterError

db, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = Ledger(Path(db))
limits = ledger.limits(["global"])
assert limits, "the test sets the global cap before starting workers"
rng = random.Random(seed)
pool = ThreadPoolExecutor(32)
held = {}  # reservation id -> usd


def say(doc):
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def call(fn, *args, **kw):
    return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kw))


async def reserve(usd, ttl):
    try:
        return await call(ledger.reserve, agent_id=name, role="worker", usd=usd, tokens=usd // 10,
                          limits=limits, model="test/model", ttl_s=ttl)
    except CharterError as exc:
        if exc.code != "budget_exceeded":
            raise
        return exc.details


async def finish(rid, usd, release, actual):
    """Settle with `actual` <= reserved (tokens too), or release."""
    if release:
        await call(ledger.release, rid, agent_id=name)
        return None
    await call(ledger.settle, rid, usd=actual, tokens_in=actual // 20, tokens_out=actual // 20, agent_id=name)
    return actual


async def hold(cmd):
    """`n` reservations at once, all kept held: usage only grows while this runs."""
    sizes = [rng.randint(cmd["lo"], cmd["hi"]) for _ in range(cmd["n"])]
    out = await asyncio.gather(*(reserve(s, cmd["ttl"]) for s in sizes))
    admitted, refused = [], []
    for size, r in zip(sizes, out):
        if isinstance(r, dict):
            refused.append([size, r["left"]])
        else:
            held[r.id] = size
            admitted.append([r.id, size])
    return {"admitted": admitted, "refused": refused}


async def close(cmd):
    """Settle (random actual <= reserved) or release every held reservation, all at once."""
    items = sorted(held.items())
    plan = [(rid, usd, rng.random() < cmd["release_ratio"], rng.randint(0, usd)) for rid, usd in items]
    out = await asyncio.gather(*(finish(*p) for p in plan))
    held.clear()
    return {"settled": [[p[0], a] for p, a in zip(plan, out) if a is not None],
            "released": [p[0] for p, a in zip(plan, out) if a is None]}


async def churn(cmd):
    """`n` reservations at once, each settled or released after a short random hold."""
    plan = [(rng.randint(cmd["lo"], cmd["hi"]), rng.random() * 0.01, rng.random() < cmd["release_ratio"],
             rng.random()) for _ in range(cmd["n"])]

    async def one(size, pause, release, frac):
        r = await reserve(size, 600)
        if isinstance(r, dict):
            return ("refused", size, 0)
        await asyncio.sleep(pause)
        actual = await finish(r.id, size, release, int(size * frac))
        return ("released", size, 0) if actual is None else ("settled", size, actual)

    out = await asyncio.gather(*(one(*p) for p in plan))
    return {"admitted": sum(1 for o in out if o[0] != "refused"),
            "admitted_usd": sum(o[1] for o in out if o[0] != "refused"),
            "refused": sum(1 for o in out if o[0] == "refused"),
            "settled": sum(1 for o in out if o[0] == "settled"),
            "committed": sum(o[2] for o in out)}


def victim(cmd):
    """Hold `k` short-TTL reservations, then die (SIGKILL) inside a write transaction under the flock."""
    mine = []
    for _ in range(cmd["k"]):
        r = ledger.reserve(agent_id=name, role="worker", usd=cmd["size"], tokens=0, limits=limits,
                           model="test/model", ttl_s=cmd["ttl"])
        mine.append([r.id, cmd["size"], r.expires_at])
    for _ in range(cmd["pairs"]):  # some finished work before the crash
        r = ledger.reserve(agent_id=name, role="worker", usd=500, tokens=0, limits=limits, ttl_s=cmd["ttl"])
        ledger.settle(r.id, usd=500, tokens_in=0, tokens_out=0)
    with ledger._txn() as conn:  # mid-flight: an uncommitted write that would blow every cap
        conn.execute("UPDATE budget_usage SET committed = committed + 1000000000000")
        say({"held": mine, "in_txn": True})
        time.sleep(120)


say({"ready": True})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "exit":
        break
    if cmd["op"] == "victim":
        victim(cmd)
    else:
        say(asyncio.run({"hold": hold, "close": close, "churn": churn}[cmd["op"]](cmd)))
ledger.close()
'''


class Worker:
    """One OS process running WORKER; commands go in on stdin, one JSON answer per line comes out."""

    def __init__(self, db: Path, name: str, seed: int, logdir: Path) -> None:
        self.name = name
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(db), name, str(seed)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker {self.name} died: {self.stderr_path.read_text()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@contextmanager
def workers(db: Path, names: list[str], logdir: Path) -> Iterator[list[Worker]]:
    ws = [Worker(db, name, 1000 + i, logdir) for i, name in enumerate(names)]
    try:
        for w in ws:
            assert w.read() == {"ready": True}
        yield ws
    finally:
        for w in ws:
            w.close()


class Monitor(threading.Thread):
    """Reads the global usage and the spend table, as often as it can, from its own connection."""

    def __init__(self, db: Path, cap: int) -> None:
        super().__init__(daemon=True)
        self.db, self.cap = db, cap
        self.samples = 0
        self.max_used = 0
        self.max_spend = 0
        self.violations: list[tuple[str, int, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None)
        try:
            while not self.done.is_set():
                conn.execute("BEGIN")  # one snapshot for both reads
                rows = conn.execute("SELECT period_key, reserved, committed FROM budget_usage "
                                    "WHERE scope = 'global' AND unit = 'usd'").fetchall()
                spend = conn.execute("SELECT day, COALESCE(SUM(usd), 0) FROM spend GROUP BY day").fetchall()
                conn.execute("COMMIT")
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
        finally:
            conn.close()

    def finish(self) -> None:
        self.done.set()
        self.join(10)
        assert self.samples >= 5, "the monitor barely ran"
        assert not self.violations, f"the cap was crossed: {self.violations[:5]}"
        assert self.max_used <= self.cap and self.max_spend <= self.cap


def fresh_ledger(tmp_path: Path, cap: int = CAP) -> Path:
    db = tmp_path / "charter.db"
    ledger = Ledger(db)
    ledger.set_limit(Limit("global", "usd", "day", hard=cap))
    ledger.close()
    return db


def db_state(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT period_key, reserved, committed FROM budget_usage "
                            "WHERE scope = 'global' AND unit = 'usd'").fetchall()
        return {
            "keys": [r[0] for r in rows],
            "reserved": sum(r[1] for r in rows),
            "committed": sum(r[2] for r in rows),
            "spend": conn.execute("SELECT COALESCE(SUM(usd), 0) FROM spend").fetchone()[0],
            "spend_by_agent": dict(conn.execute("SELECT agent_id, SUM(usd) FROM spend GROUP BY agent_id").fetchall()),
            "overruns": conn.execute("SELECT COUNT(*) FROM spend WHERE overrun").fetchone()[0],
            "states": dict(conn.execute("SELECT state, COUNT(*) FROM reservations GROUP BY state").fetchall()),
            "interleavings": sum(1 for (x,), (y,) in pairwise(
                # ids are ULIDs: in the order made, to the millisecond (the table has no rowid)
                conn.execute("SELECT agent_id FROM reservations ORDER BY id").fetchall()) if x != y),
            "held_by_agent": dict(conn.execute("SELECT agent_id, SUM(usd) FROM reservations WHERE state = 'held' "
                                               "GROUP BY agent_id").fetchall()),
        }
    finally:
        conn.close()


def assert_no_false_refusal(answers: list[dict[str, Any]], used_after: int, cap: int) -> None:
    """While usage only grew, a refusal of `size` was right only if size > cap - usage at that moment
    >= cap - usage at the end. Every refusal must pass that, and report a `left` it did not fit in."""
    refused = [r for a in answers for r in a["refused"]]
    asked = [s for a in answers for _, s in a["admitted"]] + [s for s, _ in refused]
    assert refused, "demand must exceed the cap for this test to mean anything"
    assert used_after >= cap - max(asked), f"admitted only {used_after} of {cap}: false refusals"
    for size, left in refused:
        assert size > left >= cap - used_after, (size, left, cap, used_after)


def the_day_rolled_over(state: dict[str, Any]) -> bool:
    return len(state["keys"]) > 1  # the test straddled midnight UTC: totals are split across two days


# -- exactness across processes ------------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_never_cross_the_cap_and_never_refuse_falsely(tmp_path: Path) -> None:
    db = fresh_ledger(tmp_path)
    monitor = Monitor(db, CAP)
    names = [f"agt_p{i}" for i in range(4)]
    t0 = time.monotonic()
    with workers(db, names, tmp_path) as ws:
        monitor.start()
        # Phase 1: 4 x 250 reservations at once, all held. Usage only grows, so refusals can be judged.
        for w in ws:
            w.send("hold", n=PER_PROCESS, lo=LO, hi=HI, ttl=600)
        held = [w.read() for w in ws]
        state = db_state(db)
        admitted = sum(s for a in held for _, s in a["admitted"])
        assert state["reserved"] == admitted and state["committed"] == 0
        assert admitted <= CAP
        if not the_day_rolled_over(state):
            assert_no_false_refusal(held, admitted, CAP)
        # Phase 2: every held reservation settled for less (or released), from 4 processes at once.
        for w in ws:
            w.send("close", release_ratio=0.25)
        closed = [w.read() for w in ws]
        committed = sum(a for c in closed for _, a in c["settled"])
        state = db_state(db)
        assert state["reserved"] == 0 and state["committed"] == state["spend"] == committed
        # Phase 3: reserve -> hold briefly -> settle or release, 250 in flight per process.
        for w in ws:
            w.send("churn", n=PER_PROCESS, lo=LO, hi=HI, release_ratio=0.2)
        churned = [w.read() for w in ws]
    monitor.finish()
    elapsed = time.monotonic() - t0
    committed += sum(c["committed"] for c in churned)
    state = db_state(db)
    assert state["committed"] == state["spend"] == committed <= CAP
    assert state["reserved"] == 0
    assert state["states"].get("held", 0) == 0 and state["states"].get("expired", 0) == 0
    assert state["overruns"] == 0
    assert state["interleavings"] >= 8, "the processes did not actually run at the same time"
    settled = sum(len(c["settled"]) for c in closed) + sum(c["settled"] for c in churned)
    assert state["states"]["settled"] == settled
    assert sum(c["refused"] for c in churned) > 0 and sum(c["admitted"] for c in churned) > 0
    for name, c, ch in zip(names, closed, churned):  # each process's own tally matches the spend table
        assert state["spend_by_agent"].get(name, 0) == sum(a for _, a in c["settled"]) + ch["committed"]
    assert elapsed < 60


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_mid_transaction_returns_the_held_money_after_the_ttl(tmp_path: Path) -> None:
    db = fresh_ledger(tmp_path)
    monitor = Monitor(db, CAP)
    k, size, ttl, pairs = 40, 25_000, 6.0, 20  # the victim holds $1 of the $2 cap, for 6 s (room for a loaded machine)
    with workers(db, ["agt_victim", "agt_s0", "agt_s1", "agt_s2"], tmp_path) as (victim, *survivors):
        monitor.start()
        victim.send("victim", k=k, size=size, ttl=ttl, pairs=pairs)
        crashed = victim.read()
        assert crashed["in_txn"] and len(crashed["held"]) == k
        # The victim sits inside a write transaction holding the flock: the survivors queue behind it.
        for w in survivors:
            w.send("hold", n=PER_PROCESS, lo=LO, hi=HI, ttl=600)
        time.sleep(0.3)
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert victim.proc.wait(10) == -signal.SIGKILL
        first = [w.read() for w in survivors]

        state = db_state(db)
        victim_held = state["held_by_agent"]["agt_victim"]
        r1 = sum(s for a in first for _, s in a["admitted"])
        assert victim_held == k * size  # its reservations are still held: the TTL has not passed
        assert state["committed"] == pairs * 500  # the finished pairs count; the uncommitted write is gone
        assert state["reserved"] == victim_held + r1
        assert state["committed"] + state["reserved"] <= CAP
        if not the_day_rolled_over(state):
            assert_no_false_refusal(first, state["committed"] + state["reserved"], CAP)

        # After the TTL the next reservation sweeps the victim's back into the budget.
        expiry = max(e for _, _, e in crashed["held"]) / 1000
        time.sleep(max(0.0, expiry - time.time()) + 0.2)
        assert db_state(db)["held_by_agent"]["agt_victim"] == victim_held  # nobody has written since
        for w in survivors:
            w.send("hold", n=PER_PROCESS, lo=LO, hi=HI, ttl=600)
        second = [w.read() for w in survivors]
        state = db_state(db)
        r2 = sum(s for a in second for _, s in a["admitted"])
        assert "agt_victim" not in state["held_by_agent"]
        assert state["states"]["expired"] == k
        assert state["reserved"] == r1 + r2  # the victim's share went back to 0
        assert r2 >= victim_held - HI  # ... and the survivors reserved the freed money again
        assert state["committed"] + state["reserved"] <= CAP
        if not the_day_rolled_over(state):
            assert_no_false_refusal(second, state["committed"] + state["reserved"], CAP)

        for w in survivors:
            w.send("close", release_ratio=0.25)
        closed = [w.read() for w in survivors]
    monitor.finish()
    state = db_state(db)
    assert state["reserved"] == 0 and "held" not in state["states"]
    tally = sum(a for c in closed for _, a in c["settled"])
    assert state["committed"] == state["spend"] == pairs * 500 + tally <= CAP


# -- the ledger in one process: sweeps, late settles, edge cases -----------------------------------

NOW = 1_800_000_000_000  # a fixed instant (2027-01-15T08:00Z), passed as `now`


def test_sweep_returns_expired_reservations(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "c.db")
    lims = [Limit("global", "usd", "day", 1000)]
    a = ledger.reserve(agent_id="a", role="w", usd=600, tokens=0, limits=lims, ttl_s=1, now=NOW)
    with pytest.raises(CharterError) as exc:
        ledger.reserve(agent_id="b", role="w", usd=600, tokens=0, limits=lims, now=NOW + 500)
    assert exc.value.code == BUDGET_EXCEEDED and exc.value.details["left"] == 400
    assert ledger.sweep(now=NOW + 999) == 0
    assert ledger.sweep(now=NOW + 1000) == 1
    assert ledger.usage(lims, now=NOW)[0]["reserved"] == 0
    ledger.reserve(agent_id="b", role="w", usd=1000, tokens=0, limits=lims, now=NOW + 1001)
    with pytest.raises(CharterError) as exc:
        ledger.release(a.id)
    assert exc.value.code == CONFLICT
    ledger.close()


def test_a_charter_db_from_before_on_expiry_gets_the_column_and_keeps_its_reservations(tmp_path: Path) -> None:
    """An older charter.db has no `on_expiry`: opening it adds the column, and what it held still
    gives its money back at expiry (it was reserved under that promise)."""
    import sqlite3

    path = tmp_path / "c.db"
    lims = [Limit("global", "usd", "day", 1000)]
    ledger = Ledger(path)
    ledger.reserve(agent_id="a", role="w", usd=600, tokens=0, limits=lims, ttl_s=1, now=NOW)
    ledger.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE reservations DROP COLUMN on_expiry")  # as it was before the column
    # `charter migrate` reads such a file read-only, as it is: the missing column is its default.
    from charter.budget.ledger import COLUMN_DEFAULTS, TABLES
    from charter.db import select_list

    [row] = db.execute(f"SELECT {select_list(db, 'reservations', TABLES['reservations'], COLUMN_DEFAULTS)} "
                       "FROM reservations")
    assert len(row) == len(TABLES["reservations"].split(",")) and row[-1] == "release"
    db.close()
    ledger = Ledger(path)
    assert ledger.sweep(now=NOW + 1000) == 1
    assert ledger.usage(lims, now=NOW)[0]["reserved"] == 0 and ledger.history() == []
    new = ledger.reserve(agent_id="a", role="w", usd=700, tokens=0, limits=lims, ttl_s=1, on_expiry="book",
                         now=NOW + 1000)
    assert ledger.sweep(now=NOW + 2000) == 1
    assert ledger.usage(lims, now=NOW)[0]["committed"] == 700
    with pytest.raises(CharterError):
        ledger.release(new.id)
    ledger.close()
    again = Ledger(path)  # a later opening finds the column there and changes nothing
    assert again.history(by="agent")[0]["usd_micros"] == 700 and again.sweep(now=NOW + 3000) == 0
    again.close()


def test_a_batch_settles_each_reservation_on_its_own(tmp_path: Path) -> None:
    """`settle_batch` (the gateway's settlements, booked together): each item is booked as `settle`
    would book it; one that cannot be (unknown, settled already, another agent's, an amount the
    database cannot hold) comes back as its exception and leaves the others booked."""
    ledger = Ledger(tmp_path / "c.db")
    lims = [Limit("global", "usd", "day", 10_000)]
    held = [ledger.reserve(agent_id="a", role="w", usd=1000, tokens=100, limits=lims, now=NOW) for _ in range(5)]
    ledger.settle(held[3].id, usd=10, tokens_in=1, tokens_out=1, now=NOW)
    out = ledger.settle_batch([
        SettleItem(held[0].id, 400, 3, 4, "a"),
        SettleItem("res_unknown", 1, 0, 0, "a"),
        SettleItem(held[4].id, 2**63, 0, 0, "a"),  # no 64-bit column holds it: this item fails alone
        SettleItem(held[1].id, 1500, 5, 6, "a"),  # beyond what it held: booked, an overrun
        SettleItem(held[3].id, 1, 0, 0, "a"),  # settled already
        SettleItem(held[2].id, 1, 0, 0, "someone-else"),
    ], now=NOW)
    failed = [i for i, r in enumerate(out) if isinstance(r, Exception)]
    assert failed == [1, 2, 4, 5]
    assert [out[i].code for i in (1, 4, 5)] == [NOT_FOUND, CONFLICT, NOT_FOUND]  # type: ignore[union-attr]
    assert not isinstance(out[2], CharterError)  # the database's own error, returned as it came
    assert (out[0].usd, out[0].tokens, out[0].overrun) == (400, 7, False)  # type: ignore[union-attr]
    assert out[3].overrun and out[3].alerts[0]["kind"] == "overrun"  # type: ignore[union-attr]
    use = ledger.usage(lims, now=NOW)[0]
    assert (use["reserved"], use["committed"]) == (2000, 10 + 400 + 1500)  # held[2] and held[4] still held
    assert ledger.settle(held[4].id, usd=5, tokens_in=0, tokens_out=0, now=NOW).usd == 5
    assert ledger.settle_batch([]) == []
    ledger.close()


@pytest.mark.parametrize("in_table", [True, False], ids=["operator-limit", "charter-default-limit"])
def test_a_late_settle_books_the_real_use_and_names_the_cap_it_crossed(tmp_path: Path, in_table: bool) -> None:
    """A swept reservation settled late: its money went back and was taken again, so what it really
    spent no longer fits. It is booked anyway (the books must not read as within while the spend is
    over) and the settlement is an overrun naming the cap it crossed, also for a limit that is not in
    budget_limits (an agent's default, from its charter: capped by the hard it had when reserved)."""
    ledger = Ledger(tmp_path / "c.db")
    lim = Limit("agent:agt_x", "usd", "day", 1_000_000)
    if in_table:
        ledger.set_limit(lim)
    first = ledger.reserve(agent_id="agt_x", role="w", usd=900_000, tokens=0, limits=[lim], ttl_s=1, now=NOW)
    ledger.reserve(agent_id="agt_x", role="w", usd=900_000, tokens=0, limits=[lim], now=NOW + 2000)  # sweeps first
    s = ledger.settle(first.id, usd=900_000, tokens_in=0, tokens_out=0, now=NOW + 3000)
    assert s.late and s.overrun
    use = ledger.usage([lim], now=NOW)[0]
    assert (use["reserved"], use["committed"], use["left"], use["over"]) == (900_000, 900_000, 0, 800_000)
    (alert,) = s.alerts
    assert alert["kind"] == "overrun" and alert["late"] and alert["usd"] == 900_000
    assert [(c["scope"], c["used"], c["hard"], c["over"]) for c in alert["crossed"]] == [
        ("agent:agt_x", 1_800_000, 1_000_000, 800_000)]
    assert ledger.history(by="agent")[0]["overruns"] == 1
    with pytest.raises(CharterError) as exc:
        ledger.settle(first.id, usd=1, tokens_in=0, tokens_out=0)
    assert exc.value.code == CONFLICT
    ledger.close()


def test_asking_nothing_fits_even_under_a_lowered_limit(tmp_path: Path) -> None:
    """Regression: with a limit lowered below what was already spent, `left` went negative and a
    free model's $0 reservation was refused (while the refusal pointed at free models)."""
    ledger = Ledger(tmp_path / "c.db")
    ledger.set_limit(Limit("global", "usd", "day", 1000))
    r = ledger.reserve(agent_id="a", role="w", usd=900, tokens=0, limits=ledger.limits(), now=NOW)
    ledger.settle(r.id, usd=900, tokens_in=0, tokens_out=0, now=NOW)
    ledger.set_limit(Limit("global", "usd", "day", 500))
    free = ledger.reserve(agent_id="a", role="w", usd=0, tokens=50, limits=ledger.limits(), now=NOW)
    ledger.settle(free.id, usd=0, tokens_in=20, tokens_out=30, now=NOW)
    with pytest.raises(CharterError) as exc:
        ledger.reserve(agent_id="a", role="w", usd=1, tokens=0, limits=ledger.limits(), now=NOW)
    assert exc.value.details["left"] == 0 and exc.value.details["asked"] == 1
    ledger.close()


def test_a_limit_changed_by_another_process_binds_the_next_reservation(tmp_path: Path) -> None:
    """The limits an agent is bound by are cached per ledger; a change made through any ledger on
    the file (here a second one, as another process would have) is seen at once, and a removed
    limit stops binding."""
    mine, other = Ledger(tmp_path / "c.db"), Ledger(tmp_path / "c.db")
    assert mine.applicable("a", "w", []) == []
    other.set_limit(Limit("agent:a", "usd", "day", 100))
    assert mine.applicable("a", "w", []) == [Limit("agent:a", "usd", "day", 100)]
    other.set_limit(Limit("agent:a", "usd", "day", 40))
    with pytest.raises(CharterError) as exc:
        mine.reserve(agent_id="a", role="w", usd=50, tokens=0, limits=mine.applicable("a", "w", []), now=NOW)
    assert exc.value.details["hard"] == 40
    other.set_limit(Limit("role:w", "tokens", "hour", 7))
    assert {lim.scope for lim in mine.applicable("a", "w", [])} == {"agent:a", "role:w"}
    other.remove_limit("agent:a", "usd", "day")
    assert mine.applicable("a", "w", []) == [Limit("role:w", "tokens", "hour", 7)]
    mine.close()
    other.close()


def test_a_reservation_is_all_or_nothing_across_limits(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "c.db")
    lims = [Limit("global", "usd", "day", 10_000), Limit("role:w", "tokens", "hour", 100),
            Limit("agent:a", "usd", "month", 5_000)]
    ledger.reserve(agent_id="a", role="w", usd=4_000, tokens=60, limits=lims, now=NOW)
    with pytest.raises(CharterError) as exc:  # usd fits everywhere, tokens do not fit the role's hour
        ledger.reserve(agent_id="a", role="w", usd=500, tokens=41, limits=lims, now=NOW)
    assert exc.value.where == "budget:role:w:tokens:hour"
    assert [u["reserved"] for u in ledger.usage(lims, now=NOW)] == [4_000, 60, 4_000]  # nothing taken
    ledger.reserve(agent_id="a", role="w", usd=500, tokens=41, limits=lims, now=NOW + 3_600_000)  # next hour
    ledger.close()


# -- through the daemon, with the SDK ----------------------------------------------------------

WORKER_DAY = 1_000_000  # the worker role's $1/day in the default charter.toml
FREE = ["ollama/llama3.2:3b", "ollama/qwen2.5:0.5b"]


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    return shared_daemon


def price_micros(d: Daemon, model: str, tokens_in: int, tokens_out: int) -> int:
    """The cost from the price table in charter.toml, in exact arithmetic, rounded up."""
    prices = tomllib.loads(d.home.config_path.read_text())["prices"][model]
    return math.ceil(tokens_in * Fraction(str(prices["input_per_mtok"]))
                     + tokens_out * Fraction(str(prices["output_per_mtok"])))


def has(doc: dict[str, Any], **expected: Any) -> bool:
    """`doc` holds every key of `expected` with that value (and maybe more)."""
    return {k: doc.get(k) for k in expected} == expected


def my_limit(view: dict[str, Any], agent: Agent) -> dict[str, Any]:
    (lim,) = [x for x in view["limits"] if x["scope"] == f"agent:{agent.id}" and x["unit"] == "usd"]
    return lim


def today(zone: str) -> set[str]:
    """The day's key in `zone` now and a minute ago (a test may straddle midnight)."""
    now = int(time.time() * 1000)
    return {period_key("day", now, ZoneInfo(zone)), period_key("day", now - 60_000, ZoneInfo(zone))}


async def budget_events(d: Daemon, agent: Agent | None = None, subject: str | None = None) -> list[dict[str, Any]]:
    answer = await d.admin("GET", "/v1/events", params={"pattern": "charter.budget.>", "limit": 5000})
    out = [e["envelope"] for e in answer["events"]]
    if subject:
        out = [e for e in out if e["subject"] == subject]
    if agent:
        out = [e for e in out if e["payload"].get("agent_id") == agent.id]
    return out


@pytest.mark.anyio
async def test_reserve_settle_commits_the_actual_cost_and_returns_the_rest(daemon: Daemon) -> None:
    async with await daemon.enroll("spender") as agent:
        view = await agent.budget()
        assert has(my_limit(view, agent), hard=WORKER_DAY, reserved=0, committed=0, left=WORKER_DAY, period="day")
        assert view["free_models"] == FREE

        model, tin, max_out, out = "openai/gpt-4o-mini", 1_000, 4_000, 1_234
        res = await agent.reserve(model=model, input_tokens=tin, max_output_tokens=max_out)
        asked = price_micros(daemon, model, tin, max_out)
        assert res["usd_micros"] == asked and res["tokens"] == tin + max_out
        assert res["tier"] == "T2" and res["rule"] == "paid-models"
        lim = my_limit(await agent.budget(), agent)
        assert (lim["reserved"], lim["committed"], lim["left"]) == (asked, 0, WORKER_DAY - asked)

        settled = await agent.settle(res["reservation_id"], tokens_in=tin, tokens_out=out)
        cost = price_micros(daemon, model, tin, out)
        assert cost < asked and not settled["overrun"] and not settled["late"]
        assert settled["usd"] == pytest.approx(cost / 1e6)
        lim = my_limit(await agent.budget(), agent)
        assert (lim["reserved"], lim["committed"], lim["left"]) == (0, cost, WORKER_DAY - cost)

        with pytest.raises(CharterError) as exc:  # double settle
            await agent.settle(res["reservation_id"], tokens_in=1, tokens_out=1)
        assert exc.value.code == CONFLICT
        with pytest.raises(CharterError) as exc:
            await agent.release(res["reservation_id"])
        assert exc.value.code == CONFLICT
        lim = my_limit(await agent.budget(), agent)
        assert (lim["reserved"], lim["committed"]) == (0, cost)

        # A release gives everything back.
        res2 = await agent.reserve(model="anthropic/claude-sonnet-4", input_tokens=2_000, max_output_tokens=8_000)
        assert res2["usd_micros"] == price_micros(daemon, "anthropic/claude-sonnet-4", 2_000, 8_000)
        assert my_limit(await agent.budget(), agent)["reserved"] == res2["usd_micros"]
        assert (await agent.release(res2["reservation_id"]))["released"] is True
        lim = my_limit(await agent.budget(), agent)
        assert (lim["reserved"], lim["committed"]) == (0, cost)

        settled_events = [e["payload"] for e in await budget_events(daemon, agent, f"charter.budget.{agent.name}")]
        assert [(e["event"], e["usd_micros"]) for e in settled_events] == [("settled", cost)]


@pytest.mark.anyio
async def test_only_the_owner_can_settle_or_release(daemon: Daemon) -> None:
    async with await daemon.enroll("owner") as owner, await daemon.enroll("thief") as thief:
        res = await owner.reserve(usd=0.25)
        for attempt in (thief.settle(res["reservation_id"], usd=0.0), thief.release(res["reservation_id"]),
                        owner.settle("res_nonexistent", usd=0.0)):
            with pytest.raises(CharterError) as exc:
                await attempt
            assert exc.value.code == NOT_FOUND
        assert my_limit(await owner.budget(), owner)["reserved"] == 250_000
        await owner.settle(res["reservation_id"], usd=0.1)
        lim = my_limit(await owner.budget(), owner)
        assert (lim["reserved"], lim["committed"]) == (0, 100_000)
        assert my_limit(await thief.budget(), thief)["committed"] == 0


@pytest.mark.anyio
async def test_exhausted_budget_refuses_with_what_is_left_and_the_free_models(daemon: Daemon) -> None:
    async with await daemon.enroll("broke") as agent:
        first = await agent.reserve(usd=0.9)
        with pytest.raises(CharterError) as exc:
            await agent.reserve(model="openai/gpt-4o", input_tokens=10_000, max_output_tokens=20_000)  # $0.225
        err = exc.value
        assert err.code == BUDGET_EXCEEDED and err.where == f"budget:agent:{agent.id}:usd:day"
        assert err.details["asked"] == price_micros(daemon, "openai/gpt-4o", 10_000, 20_000) == 225_000
        assert err.details["left"] == 100_000 and err.details["reserved"] == 900_000
        assert err.details["free_models"] == FREE
        assert "$0.1 left of $1" in err.message

        refused = [e["payload"] for e in await budget_events(daemon, agent, f"charter.budget.{agent.name}")
                   if e["payload"]["event"] == "refused"]
        assert len(refused) == 1
        assert refused[0]["asked"] == 225_000 and refused[0]["left"] == 100_000
        assert refused[0]["free_models"] == FREE

        # Degrading to a free model works: it costs nothing (its tokens still count).
        local = await agent.reserve(model=FREE[0], input_tokens=500, max_output_tokens=500)
        assert local["usd_micros"] == 0 and local["tier"] == "T1"
        await agent.settle(local["reservation_id"], tokens_in=500, tokens_out=100)
        await agent.settle(first["reservation_id"], usd=0.9)
        with pytest.raises(CharterError) as exc:
            await agent.reserve(usd=0.100001)
        assert exc.value.details["left"] == 100_000
        await agent.reserve(usd=0.1)  # exactly what is left fits
        lim = my_limit(await agent.budget(), agent)
        assert (lim["reserved"], lim["committed"], lim["left"]) == (100_000, 900_000, 0)


@pytest.mark.anyio
async def test_soft_threshold_alerts_once_per_period(daemon: Daemon) -> None:
    async with await daemon.enroll("alerty") as agent:
        a = await agent.reserve(usd=0.5)
        assert await budget_events(daemon, agent, "charter.budget.alerts") == []
        b = await agent.reserve(usd=0.29)  # 79%
        assert await budget_events(daemon, agent, "charter.budget.alerts") == []
        c = await agent.reserve(usd=0.01)  # 80%: the soft threshold
        alerts = [e["payload"] for e in await budget_events(daemon, agent, "charter.budget.alerts")]
        assert len(alerts) == 1
        assert has(alerts[0], scope=f"agent:{agent.id}", unit="usd", period="day", used=800_000, hard=WORKER_DAY,
                   soft_ratio=0.8, name=agent.name)
        assert alerts[0]["period_key"] in today("UTC")
        # Going back under and over again, and further up, alerts no more in this period.
        for rid in (a, b, c):
            await agent.release(rid["reservation_id"])
        d = await agent.reserve(usd=0.95)
        await agent.settle(d["reservation_id"], usd=0.95)
        assert len(await budget_events(daemon, agent, "charter.budget.alerts")) == 1


@pytest.mark.anyio
async def test_a_tier_cap_refusal_names_the_cap(daemon: Daemon) -> None:
    async with await daemon.enroll("bigspender", "coordinator") as agent:  # $5/day: the T2 cap binds first
        with pytest.raises(CharterError) as exc:
            await agent.reserve(model="openai/gpt-4o", max_output_tokens=300_000)  # $3 in one call
        err = exc.value
        assert err.code == BUDGET_EXCEEDED and err.where == "tier_cap:T2"
        assert "at most $2" in err.message
        assert has(err.details, asked=3_000_000, cap=2_000_000, tier="T2")
        assert err.details["free_models"] == FREE
        refused = [e["payload"] for e in await budget_events(daemon, agent, f"charter.budget.{agent.name}")]
        assert [(e["event"], e["cap"]) for e in refused] == [("refused", 2_000_000)]
        ok = await agent.reserve(model="openai/gpt-4o", max_output_tokens=200_000)  # $2: at the cap
        assert ok["usd_micros"] == 2_000_000
        lim = my_limit(await agent.budget(), agent)
        assert (lim["hard"], lim["reserved"]) == (5_000_000, 2_000_000)


@pytest.mark.anyio
async def test_a_swept_reservation_settled_late_is_booked_and_alerts_the_overrun(daemon: Daemon) -> None:
    """End to end: the agent's $1/day comes from its charter, not from budget_limits. The late spend is
    booked in full, the budget reads as over (nothing left), and an overrun alert names the cap."""
    async with await daemon.enroll("slowpoke") as agent:
        first = await agent.http.call("POST", "/v1/agent/budget/reserve", json={"usd": 0.9, "ttl_s": 0.2})
        await asyncio.sleep(0.3)
        await agent.reserve(usd=0.9)  # sweeps the first one, then takes its money
        late = await agent.settle(first["reservation_id"], usd=0.9)
        assert late["late"] and late["overrun"]
        lim = my_limit(await agent.budget(), agent)
        assert (lim["reserved"], lim["committed"], lim["left"], lim["over"]) == (900_000, 900_000, 0, 800_000)
        alerts = [e["payload"] for e in await budget_events(daemon, agent, "charter.budget.alerts")
                  if e["payload"].get("kind") == "overrun"]
        assert len(alerts) == 1 and alerts[0]["reservation_id"] == first["reservation_id"]
        assert [(c["scope"], c["over"]) for c in alerts[0]["crossed"]] == [(f"agent:{agent.id}", 800_000)]
        with pytest.raises(CharterError) as exc:
            await agent.reserve(usd=0.000001)
        assert exc.value.code == BUDGET_EXCEEDED and exc.value.details["left"] == 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_operator_sets_a_global_limit_that_binds(tmp_path: Path) -> None:
    tz = "Asia/Kolkata"
    home = make_home(tmp_path / "home", timezone=f'"{tz}"')
    d = start_daemon(home)
    try:
        async with await d.enroll("one") as one, await d.enroll("two") as two:
            set_ = await d.admin("PUT", "/v1/admin/budget",
                                 json={"scope": "global", "unit": "usd", "period": "day", "limit": 0.01})
            assert set_["hard"] == 10_000
            await one.reserve(usd=0.006)
            with pytest.raises(CharterError) as exc:
                await two.reserve(usd=0.006)  # two's own $1 has plenty; the global cap does not
            assert exc.value.where == "budget:global:usd:day" and exc.value.details["left"] == 4_000
            assert exc.value.details["period_key"] in today(tz)
            r = await two.reserve(usd=0.004)
            await two.settle(r["reservation_id"], usd=0.003)

            overview = await d.admin("GET", "/v1/admin/budget")
            assert overview["timezone"] == tz
            (g,) = [b for b in overview["budgets"] if b["scope"] == "global"]
            assert (g["hard"], g["reserved"], g["committed"], g["left"]) == (10_000, 6_000, 3_000, 1_000)
            limits_events = await budget_events(d, subject="charter.budget.limits")
            assert has(limits_events[-1]["payload"], scope="global", unit="usd", period="day", hard=10_000,
                       removed=False)

            # Lowered below what is used: paid calls are refused, a free model still is not.
            await d.admin("PUT", "/v1/admin/budget", json={"scope": "global", "unit": "usd", "limit": 0.001})
            with pytest.raises(CharterError) as exc:
                await one.reserve(usd=0.000001)
            assert exc.value.code == BUDGET_EXCEEDED and exc.value.details["left"] == 0
            free = await one.reserve(model=FREE[1], input_tokens=10, max_output_tokens=10)
            assert free["usd_micros"] == 0

            # Removed: only the agents' own limits bind again.
            await d.admin("PUT", "/v1/admin/budget", json={"scope": "global", "unit": "usd", "limit": 0,
                                                           "remove": True})
            await two.reserve(usd=0.5)
            # A role limit in tokens binds every agent of the role.
            await d.admin("PUT", "/v1/admin/budget",
                          json={"scope": "role:worker", "unit": "tokens", "period": "hour", "limit": 1000})
            await one.reserve(model=FREE[0], input_tokens=400, max_output_tokens=400)
            with pytest.raises(CharterError) as exc:
                await two.reserve(model=FREE[0], input_tokens=100, max_output_tokens=200)
            assert exc.value.where == "budget:role:worker:tokens:hour" and exc.value.details["left"] == 200
    finally:
        stop(home)


# -- periods ------------------------------------------------------------------------------------


def ms(iso: str) -> int:
    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


@pytest.mark.parametrize(("zone", "before", "after", "keys_before", "keys_after"), [
    # Kolkata is UTC+05:30 all year: local midnight is 18:30 UTC the day before.
    ("Asia/Kolkata", "2026-03-31T18:29:59.999+00:00", "2026-03-31T18:30:00+00:00",
     ("2026-03-31T23", "2026-03-31", "2026-03"), ("2026-04-01T00", "2026-04-01", "2026-04")),
    ("Asia/Kolkata", "2026-12-31T18:29:59.999+00:00", "2026-12-31T18:30:00+00:00",
     ("2026-12-31T23", "2026-12-31", "2026-12"), ("2027-01-01T00", "2027-01-01", "2027-01")),
    # New York: midnight is 04:00 UTC in summer (EDT) and 05:00 UTC in winter (EST).
    ("America/New_York", "2026-07-01T03:59:59.999+00:00", "2026-07-01T04:00:00+00:00",
     ("2026-06-30T23", "2026-06-30", "2026-06"), ("2026-07-01T00", "2026-07-01", "2026-07")),
    ("America/New_York", "2027-01-01T04:59:59.999+00:00", "2027-01-01T05:00:00+00:00",
     ("2026-12-31T23", "2026-12-31", "2026-12"), ("2027-01-01T00", "2027-01-01", "2027-01")),
    # The night DST ends (2026-11-01): the day starts at 04:00 UTC (EDT) and lasts 25 hours.
    ("America/New_York", "2026-11-01T03:59:59.999+00:00", "2026-11-01T04:00:00+00:00",
     ("2026-10-31T23", "2026-10-31", "2026-10"), ("2026-11-01T00", "2026-11-01", "2026-11")),
    ("America/New_York", "2026-11-02T04:59:59.999+00:00", "2026-11-02T05:00:00+00:00",
     ("2026-11-01T23", "2026-11-01", "2026-11"), ("2026-11-02T00", "2026-11-02", "2026-11")),
])
def test_period_keys_at_local_midnight(zone: str, before: str, after: str,
                                       keys_before: tuple[str, str, str], keys_after: tuple[str, str, str]) -> None:
    tz = ZoneInfo(zone)
    for at, keys in ((before, keys_before), (after, keys_after)):
        assert tuple(period_key(p, ms(at), tz) for p in ("hour", "day", "month")) == keys
        assert period_key("total", ms(at), tz) == "total"
    # In UTC the same two instants are on the same day.
    assert period_key("day", ms(before), ZoneInfo("UTC")) == period_key("day", ms(after), ZoneInfo("UTC"))
    with pytest.raises(ValueError):
        period_key("week", ms(before), tz)


def test_the_ledger_rolls_over_at_local_midnight(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "c.db", timezone="Asia/Kolkata")
    lims = [Limit("global", "usd", "day", 1_000)]
    before, after = ms("2026-03-31T18:29:59.999+00:00"), ms("2026-03-31T18:30:00+00:00")
    ledger.reserve(agent_id="a", role="w", usd=1_000, tokens=0, limits=lims, now=before)
    with pytest.raises(CharterError):
        ledger.reserve(agent_id="a", role="w", usd=1, tokens=0, limits=lims, now=before)
    r = ledger.reserve(agent_id="a", role="w", usd=1_000, tokens=0, limits=lims, now=after)  # a new day
    ledger.settle(r.id, usd=10, tokens_in=0, tokens_out=0, now=after)
    assert [u["period_key"] for u in ledger.usage(lims, now=after)] == ["2026-04-01"]
    assert ledger.history(by="day") == [{"day": "2026-04-01", "calls": 1, "usd_micros": 10, "tokens_in": 0,
                                         "tokens_out": 0, "overruns": 0}]
    ledger.close()


def test_the_ledgers_commits_do_not_checkpoint_inline_at_sqlites_default(tmp_path: Path) -> None:
    """The ledger's WAL is checkpointed by its background thread; a commit that crosses
    SQLite's default threshold (1000 pages) would otherwise copy the WAL into the database file, with
    fsyncs, inside a model call. Past 1000 pages of ledger commits, the database file is untouched."""
    db = tmp_path / "budget.db"
    ledger = Ledger(db, background_checkpoints=False)  # (its own thread would touch the file: not this test's)
    lims = [Limit("global", "usd", "day", 10**15), Limit("global", "tokens", "day", 10**15)]
    ledger.reserve(agent_id="a", role="w", usd=1, tokens=1, limits=lims, now=NOW)
    before = (db.stat().st_size, db.stat().st_mtime_ns)
    wal = db.with_name(db.name + "-wal")
    pairs = 0
    while wal.stat().st_size < 1300 * 4096:  # well past 1000 pages (4 KiB each)
        r = ledger.reserve(agent_id="a", role="w", usd=10, tokens=10, limits=lims, now=NOW + pairs)
        ledger.settle(r.id, usd=5, tokens_in=2, tokens_out=3, now=NOW + pairs)
        pairs += 1
        assert pairs < 20_000
    assert (db.stat().st_size, db.stat().st_mtime_ns) == before
    ledger.close()


def test_a_reservation_with_headroom_needs_that_much_left_after_it(tmp_path: Path) -> None:
    """`headroom` (a spare reservation's, charter.budget.spares): refused unless every limit keeps
    that many times the amount free after it; without it the same amount fits."""
    ledger = Ledger(tmp_path / "b.db")
    try:
        lim = [Limit("global", "usd", "day", 1000)]
        ask = {"agent_id": "agt_a", "role": "w", "usd": 100, "tokens": 0, "limits": lim}
        ledger.reserve(**ask, headroom=8)  # 1000 left: 100 + 8 x 100 fits
        ledger.reserve(**ask, headroom=8)  # 900 left: exactly
        with pytest.raises(CharterError) as refused:
            ledger.reserve(**ask, headroom=8)  # 800 left
        assert refused.value.code == BUDGET_EXCEEDED
        assert ledger.usage(lim)[0]["reserved"] == 200  # the refusal took nothing
        ledger.reserve(**ask)  # a call's own reservation needs only its amount
        assert ledger.usage(lim)[0]["reserved"] == 300
        ledger.reserve(**{**ask, "usd": 490})  # 790 of 1000: below the soft alert's 80%
        with pytest.raises(CharterError) as alerting:  # room enough, but it would raise the soft alert
            ledger.reserve(**{**ask, "usd": 10}, headroom=8)
        assert alerting.value.code == BUDGET_EXCEEDED and "soft alert" in alerting.value.message
        assert ledger.reserve(**{**ask, "usd": 10}).alerts  # the call that is made raises it
    finally:
        ledger.close()

"""Throughput and latency of the budget ledger: reserve + settle pairs against one SQLite file.

    .venv/bin/python benchmarks/budget.py            # the full run (about 20 s)
    .venv/bin/python benchmarks/budget.py --quick    # a smoke run: same shape, tiny counts

Prints ONE JSON document on stdout; progress goes to stderr. Every scenario runs `Ledger.reserve`
then `Ledger.settle` (actual < reserved, so part of each reservation goes back) in a closed loop, each
process with its own `Ledger` on the same database file, as several daemons or tools on one
CHARTER_HOME would. Each reservation checks two limits (a global one and the agent's own), as the
daemon does for an agent whose operator set a global cap.

  multi       `--procs` processes (default 4), the ledger as shipped: an exclusive flock around
              every IMMEDIATE transaction. Target: >= 5000 pairs/s in total.
  single      the baseline: the same pairs from 1 process (no contention at all).
  busy_timeout the same `--procs` processes with the flock removed (a Ledger subclass in this file):
              writers queue in SQLite's own busy handler (busy_timeout = 10 s), which sleeps and
              retries in steps of milliseconds instead of waking the next writer at once.

The scenarios are interleaved for `--rounds` rounds (each on a fresh database) and every figure is
the median over rounds, so a noisy neighbour hurts all scenarios alike. After each run the ledger is
checked: nothing left reserved, committed == the sum of the spend table.
Latency is of one pair (reserve + settle) as seen by the caller, in milliseconds. `fairness` is the
slowest process's rate over the fastest's (1 = all processes served alike). `cpu_ms_per_pair` is the
workers' own CPU time per pair; `other_processes_cpu_share` is the share of the machine's CPU that
went to anything else during the run (from /proc/stat; null where there is none): when it is high,
the machine was busy and the absolute figures are low, so compare ratios across runs instead.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # runnable from a checkout without an editable install
    sys.path.insert(0, str(ROOT / "src"))

from charter import __version__  # noqa: E402
from charter.budget.ledger import Ledger, Limit  # noqa: E402

TARGET_PAIRS_PER_S = 5000.0
CAP = 10**15  # micro-dollars: high enough that nothing is ever refused
RESERVE_USD = 2_000  # $0.002, about a gpt-4o-mini call with 3k output tokens
SETTLE_USD = 1_234


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BusyTimeoutLedger(Ledger):
    """The ledger without the flock: concurrent writers wait in SQLite's busy handler. All else
    as the ledger does it, the background checkpoints included, so that only the lock differs."""

    @contextmanager
    def _txn(self, *, limits_changed: bool = False) -> Iterator[Any]:
        with self._thread_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if not limits_changed:
                self._after_commit(False)
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # the limits counter's read-and-write, as the ledger's
            try:
                self._after_commit(True)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


LEDGERS: dict[str, type[Ledger]] = {"flock": Ledger, "busy_timeout": BusyTimeoutLedger}


def worker(db: str, kind: str, index: int, seconds: float, max_pairs: int, warmup: int,
           start: Any, out: Any) -> None:
    """One process: open a ledger, warm up, wait for the others, then reserve+settle until time is up."""
    ledger = LEDGERS[kind](Path(db))
    agent = f"agt_bench{index}"
    limits = [Limit("global", "usd", "day", CAP), Limit(f"agent:{agent}", "usd", "day", CAP)]
    for _ in range(warmup):
        r = ledger.reserve(agent_id=agent, role="worker", usd=RESERVE_USD, tokens=100, limits=limits,
                           model="openai/gpt-4o-mini")
        ledger.settle(r.id, usd=SETTLE_USD, tokens_in=10, tokens_out=20)
    start.wait()
    lat: list[int] = []
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    t_start = time.monotonic()
    deadline = t_start + seconds
    n = 0
    while n < max_pairs:
        t0 = clock()
        r = ledger.reserve(agent_id=agent, role="worker", usd=RESERVE_USD, tokens=100, limits=limits,
                           model="openai/gpt-4o-mini")
        ledger.settle(r.id, usd=SETTLE_USD, tokens_in=10, tokens_out=20)
        lat.append(clock() - t0)
        n += 1
        if (n & 31) == 0 and time.monotonic() >= deadline:
            break
    t_end = time.monotonic()
    cpu = time.process_time() - cpu0
    ledger.close()
    out.put({"index": index, "pairs": n, "start": t_start, "end": t_end, "cpu_s": cpu, "lat_ns": lat})


def busy_cpu_seconds() -> float | None:
    """CPU seconds spent by everything on this machine so far (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 1)) - 1))
    return sorted_values[k]


def check_ledger(db: Path) -> dict[str, Any]:
    """After a run: nothing held, committed equals the spend table, per limit."""
    conn = sqlite3.connect(db)
    try:
        held = conn.execute("SELECT COUNT(*) FROM reservations WHERE state = 'held'").fetchone()[0]
        reserved = conn.execute("SELECT COALESCE(SUM(reserved), 0) FROM budget_usage").fetchone()[0]
        committed = conn.execute(
            "SELECT COALESCE(SUM(committed), 0) FROM budget_usage WHERE scope = 'global'").fetchone()[0]
        spend = conn.execute("SELECT COALESCE(SUM(usd), 0) FROM spend").fetchone()[0]
        settled = conn.execute("SELECT COUNT(*) FROM spend").fetchone()[0]
    finally:
        conn.close()
    return {"held": held, "reserved": reserved, "committed": committed, "spend": spend, "settled": settled,
            "exact": held == 0 and reserved == 0 and committed == spend == settled * SETTLE_USD}


def run_scenario(workdir: Path, name: str, kind: str, procs: int, seconds: float, max_pairs: int,
                 warmup: int) -> dict[str, Any]:
    db = workdir / f"{name}-{time.monotonic_ns()}.db"
    Ledger(db).close()  # create the schema once, before the workers race to
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    ps = [ctx.Process(target=worker, args=(str(db), kind, i, seconds, max_pairs, warmup, start, out))
          for i in range(procs)]
    for p in ps:
        p.start()
    start.wait(timeout=120)
    busy0 = busy_cpu_seconds()
    results = [out.get(timeout=seconds + 120) for _ in ps]
    busy1 = busy_cpu_seconds()
    for p in ps:
        p.join(timeout=30)
        if p.exitcode != 0:
            raise RuntimeError(f"{name}: a worker exited with {p.exitcode}")
    pairs = sum(r["pairs"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    lat = sorted(x / 1e6 for r in results for x in r["lat_ns"])  # every worker runs at least one pair
    per_proc = [r["pairs"] / max(r["end"] - r["start"], 1e-9) for r in results]
    ours = sum(r["cpu_s"] for r in results)
    # The share of the machine's CPU time during the run that went to other processes: noise.
    other = (max(busy1 - busy0 - ours, 0.0) / (wall * (os.cpu_count() or 1))
             if busy0 is not None and busy1 is not None else None)
    check = check_ledger(db)
    if check["settled"] != pairs + warmup * procs or not check["exact"]:
        raise RuntimeError(f"{name}: the ledger is not exact after the run: {check}")
    for suffix in ("", "-wal", "-shm", ".ledger.lock"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    return {"pairs": pairs, "seconds": wall, "pairs_per_s": pairs / wall,
            "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99), "p999_ms": pct(lat, 0.999),
            "max_ms": lat[-1],
            "slowest_process_pairs_per_s": min(per_proc), "fastest_process_pairs_per_s": max(per_proc),
            "fairness": min(per_proc) / max(per_proc),
            "cpu_ms_per_pair": 1000 * ours / max(pairs, 1), "other_processes_cpu_share": other,
            "exact": check["exact"]}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("pairs_per_s", "p50_ms", "p99_ms", "p999_ms", "max_ms", "slowest_process_pairs_per_s",
            "fastest_process_pairs_per_s", "fairness", "cpu_ms_per_pair", "other_processes_cpu_share")
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in rounds), 3) if rounds[0][k] is not None else None
                           for k in keys}
    out["pairs"] = sum(r["pairs"] for r in rounds)
    out["per_round_pairs_per_s"] = [round(r["pairs_per_s"], 1) for r in rounds]
    out["exact"] = all(r["exact"] for r in rounds)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny counts, one round")
    ap.add_argument("--procs", type=int, default=4, help="processes in the multi-process scenarios")
    ap.add_argument("--seconds", type=float, default=None, help="duration of each scenario run (default 2, quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--dir", default=None, help="where the temporary databases go (default: the system temp dir)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 2.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    max_pairs = 300 if args.quick else 10**9
    warmup = 20 if args.quick else 200
    workdir = Path(tempfile.mkdtemp(prefix="charter-bench-budget-", dir=args.dir))
    scenarios = [("multi", "flock", args.procs), ("single", "flock", 1), ("busy_timeout", "busy_timeout", args.procs)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in scenarios}
    t0 = time.monotonic()
    try:
        for i in range(rounds):
            for name, kind, procs in scenarios:
                r = run_scenario(workdir, name, kind, procs, seconds, max_pairs, warmup)
                runs[name].append(r)
                progress(f"round {i + 1}/{rounds} {name:>12}: {r['pairs_per_s']:8.0f} pairs/s  "
                         f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    multi, single, busy = (summarise(runs[name]) for name, _, _ in scenarios)
    doc = {
        "benchmark": "budget ledger: reserve + settle pairs",
        "charter_version": __version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "procs": args.procs,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "limits_per_reservation": 2,
        "multi_process": multi,
        "single_process_baseline": single,
        "busy_timeout_variant": busy,
        "multi_vs_single": round(multi["pairs_per_s"] / single["pairs_per_s"], 3),
        "flock_vs_busy_timeout": round(multi["pairs_per_s"] / busy["pairs_per_s"], 3),
        "target_pairs_per_s": TARGET_PAIRS_PER_S,
        "meets_target": multi["pairs_per_s"] >= TARGET_PAIRS_PER_S,
        "exact": multi["exact"] and single["exact"] and busy["exact"],
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

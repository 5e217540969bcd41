"""What a SIGKILLed primary backend costs: the gap until the backup answers, then every request after.

    .venv/bin/python benchmarks/failover.py            # the full run (a few minutes with LiteLLM)
    .venv/bin/python benchmarks/failover.py --quick    # a smoke run: same shape, tiny counts, no LiteLLM

Prints ONE JSON document on stdout; progress goes to stderr.

Two stand-in backends (`charter.models.standin`, OpenAI-compatible /v1 layer, token_delay 0):
a primary serving `llama3.2:3b` and a backup serving `qwen2.5:0.5b`. Charter (a real `charter up`,
default breaker, timeouts and probes) has the alias `failover` = [primary, backup] and the alias
`backup-only` = [backup]; an agent calls them with its bearer API key.

  1. before the kill: `failover` (the primary answers) and `backup-only`, closed loop, c=1.
  2. the kill: steady traffic on `failover` (`--workers` clients, each pausing `--think` ms between
     requests); the primary gets SIGKILL mid-traffic. Measured: the time from the kill to the first
     good answer from the backup, the client-visible failures after the kill, and the latency of the
     first request answered by the backup.
  3. circuit open: `failover` against `backup-only`, interleaved rounds, c=1. The added latency of
     each request while the primary is dead and its circuit open is failover minus backup-only, per
     percentile. Target: <= 1 ms at p50 and p99.

LiteLLM (PyPI `litellm[proxy]`, its own venv, no database) runs the same three phases with two
model groups, `primary` and `backup`, linked by `fallbacks` (the way its docs set up a fallback),
once with its defaults and once with `num_retries: 0`; a fresh primary stand-in each time. A
LiteLLM request that takes seconds is bounded by `--litellm-window` so the run ends.

The machines are shared: Charter's rounds in phases 1 and 3 are run again when other processes took
more than 15% of the CPU meanwhile (at most 3 times); every phase reports the share it ran under.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from gwlib import (  # noqa: E402
    LITELLM_MASTER_KEY,
    ROLE_NO_BUDGET,
    Busy,
    StartError,
    Pinning,
    Target,
    charter_home,
    ensure_litellm,
    environment,
    litellm_config,
    litellm_model,
    progress,
    r3,
    rmtree_quiet,
    session,
    start_charter,
    start_litellm,
    start_standin,
    summary_ms,
    wait_calm,
)

PRIMARY_MODEL, BACKUP_MODEL = "llama3.2:3b", "qwen2.5:0.5b"
TARGET_ADDED_MS = 1.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny counts, no LiteLLM: checks the shape only")
    p.add_argument("--requests", type=int, default=None, help="requests per alias in phases 1 and 3")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--workers", type=int, default=4, help="clients sending steady traffic during the kill")
    p.add_argument("--think", type=float, default=5.0, help="pause between a worker's requests, ms")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--litellm-window", type=float, default=45.0,
                   help="seconds of traffic LiteLLM gets after the kill, and for phase 3, at most")
    p.add_argument("--calm-wait", type=float, default=None)
    return p.parse_args()


@dataclass
class Call:
    sent: float
    done: float
    status: int
    backend: str | None  # "primary" | "backup" | None (no good answer)

    @property
    def latency(self) -> float:
        return self.done - self.sent


def which_backend(body: bytes) -> str | None:
    """Which stand-in answered: Charter names the rung; the stand-ins' own model names tell otherwise."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not doc.get("choices"):
        return None
    ref = (doc.get("charter") or {}).get("backend") or doc.get("model") or ""
    if ref.startswith("primary") or PRIMARY_MODEL in ref:
        return "primary"
    if ref.startswith("backup") or BACKUP_MODEL in ref:
        return "backup"
    return "unknown"


async def call(http: aiohttp.ClientSession, t: Target, body: bytes) -> Call:
    t0 = time.perf_counter()
    try:
        async with http.post(t.url, data=body, headers=t.headers()) as r:
            data = await r.read()
            status = r.status
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return Call(t0, time.perf_counter(), 0, None)
    done = time.perf_counter()
    return Call(t0, done, status, which_backend(data) if status == 200 else None)


async def closed(t: Target, n: int, http: aiohttp.ClientSession, deadline: float | None = None) -> list[Call]:
    body = t.body(False)
    out = []
    for _ in range(n):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        out.append(await call(http, t, body))
    return out


def lat_summary(calls: list[Call], want: str) -> dict[str, Any]:
    ok = [c.latency for c in calls if c.status == 200 and c.backend == want]
    s = summary_ms(ok)
    s["not_answered_by_" + want] = len(calls) - len(ok)
    return s


async def compare(fail: Target, only: Target, *, n: int, rounds: int, want: str, window: float | None,
                  busy: Busy | None = None, calm_wait: float = 0.0, max_share: float = 0.15, redo: int = 3
                  ) -> dict[str, Any]:
    """`fail` (the two-rung chain) against `only` (the backup alone), interleaved, c=1.

    With a `window` (seconds), each alias gets an equal share of it per round, and at least one
    request. A round during which other processes took more than `max_share` of the machine is
    thrown away (both aliases' part alike) and run again after a calm spell, at most `redo` times.
    """
    a: list[Call] = []
    b: list[Call] = []
    kept: list[float | None] = []
    dropped: list[float | None] = []
    share = window / (2 * rounds) if window else None
    async with session(1) as h1, session(1) as h2:
        for rnd in range(rounds):
            k = n // rounds
            for attempt in range(redo + 1):
                if busy:
                    busy.start()
                got: dict[str, list[Call]] = {"a": [], "b": []}
                pair = [(fail, "a", h1), (only, "b", h2)]
                for t, key, h in pair if rnd % 2 == 0 else pair[::-1]:
                    got[key] += await closed(t, 1, h)
                    deadline = time.perf_counter() + share if share else None
                    got[key] += await closed(t, k - 1, h, deadline)
                load = busy.share() if busy else None
                if load is not None and load > max_share and attempt < redo and calm_wait > 0 and busy:
                    dropped.append(load)
                    progress(f"  round {rnd + 1}: other processes took {load:.0%} of the CPU; running it again")
                    await wait_calm(busy, max_wait=calm_wait)
                    continue
                kept.append(load)
                a += got["a"]
                b += got["b"]
                break
    fa, ba = lat_summary(a, want), lat_summary(b, "backup")
    added = {q: r3(fa[q] - ba[q]) for q in ("p50", "p90", "p99")} if fa["n"] and ba["n"] else None
    return {"through_failover_alias": fa, "backup_only": ba, "added_ms": added,
            "others_cpu_share_per_round_kept": kept, "rounds_dropped_for_load": len(dropped)}


async def kill_phase(fail: Target, kill: Any, *, workers: int, think: float, before: float, after: float,
                     max_after: float) -> dict[str, Any]:
    """Steady traffic; SIGKILL the primary `before` s in; go on until the backup answered and `after` s passed."""
    calls: list[Call] = []
    body = fail.body(False)
    t_kill: float | None = None
    stop = asyncio.Event()
    sessions = [session(1) for _ in range(workers)]

    async def worker(h: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            calls.append(await call(h, fail, body))
            await asyncio.sleep(think / 1000)

    tasks = [asyncio.create_task(worker(h)) for h in sessions]
    try:
        await asyncio.sleep(before)
        t_kill = time.perf_counter()
        kill()
        t_end = t_kill + max_after
        while time.perf_counter() < t_end:
            await asyncio.sleep(0.05)
            backed = [c for c in calls if c.backend == "backup" and c.done > t_kill]
            if backed and time.perf_counter() - t_kill >= after:
                break
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=5.0)
        for t in pending:
            t.cancel()
    finally:
        for h in sessions:
            await h.close()
    assert t_kill is not None
    after_kill = [c for c in calls if c.done > t_kill]
    in_flight = [c for c in calls if c.sent < t_kill < c.done]
    backed = sorted((c for c in after_kill if c.backend == "backup"), key=lambda c: c.done)
    failures = [c for c in after_kill if c.status != 200 or c.backend is None]
    first = backed[0] if backed else None
    return {
        "kill_to_first_backup_answer_ms": r3((first.done - t_kill) * 1000) if first else None,
        "first_backup_answer_request_latency_ms": r3(first.latency * 1000) if first else None,
        "first_backup_answer_was_in_flight_at_kill": bool(first and first.sent < t_kill),
        "requests_before_kill": len([c for c in calls if c.done <= t_kill]),
        "requests_in_flight_at_kill": len(in_flight),
        "requests_finished_after_kill": len(after_kill),
        "client_visible_failures_after_kill": len(failures),
        "answered_by_primary_after_kill": len([c for c in after_kill if c.backend == "primary"]),  # sent before it
        "sent_after_kill_answered_by_primary": len([c for c in calls if c.sent > t_kill and c.backend == "primary"]),
        "traffic_after_kill_s": r3(max((c.done for c in calls), default=t_kill) - t_kill),
        "latency_after_kill_ms": summary_ms([c.latency for c in after_kill if c.backend == "backup"]),
        "workers": workers, "think_ms": think,
    }


async def charter_side(args: argparse.Namespace, pinning: Pinning, tmp: Path, n: int, rounds: int,
                       busy: Busy, busy_pids: list[int]) -> dict[str, Any]:
    primary = start_standin(pinning, [PRIMARY_MODEL], token_delay=0.0)
    backup = start_standin(pinning, [BACKUP_MODEL], token_delay=0.0)
    charter = None
    try:
        home = charter_home(tmp / "home", backends={"primary": primary.url + "/v1", "backup": backup.url + "/v1"},
                            aliases={"failover": [f"primary/{PRIMARY_MODEL}", f"backup/{BACKUP_MODEL}"],
                                     "backup-only": [f"backup/{BACKUP_MODEL}"]},
                            prices={f"primary/{PRIMARY_MODEL}": (0.0, 0.0), f"backup/{BACKUP_MODEL}": (0.0, 0.0)},
                            roles_extra=ROLE_NO_BUDGET)
        charter = start_charter(home, pinning)
        busy_pids[1:] = [primary.pid, backup.pid, charter.pid]
        busy.start()
        agent = await charter.enroll("failbench", "benchfree")
        url = charter.url + "/v1/chat/completions"
        fail = Target("failover", url, agent.api_key, "failover", charter.pid)
        only = Target("backup-only", url, agent.api_key, "backup-only", charter.pid)
        await agent.close()
        async with session(1) as h:
            await closed(fail, 100, h)
            await closed(only, 100, h)
        progress(f"charter: before the kill ({n} requests per alias)")
        before = await compare(fail, only, n=n, rounds=rounds, want="primary", window=None, busy=busy,
                               calm_wait=args.calm)
        out: dict[str, Any] = {"before_kill": before}
        progress("charter: steady traffic, SIGKILL the primary")
        if args.calm > 0:
            await wait_calm(busy, max_wait=args.calm)
        busy.start()
        out["kill"] = await kill_phase(fail, lambda: (busy.sample(), primary.kill()), workers=args.workers,
                                       think=args.think, before=0.5,
                                       after=1.0, max_after=30.0)
        out["kill"]["others_cpu_share_during"] = busy.share()
        progress(f"charter: circuit open ({n} requests per alias)")
        out["circuit_open"] = await compare(fail, only, n=n, rounds=rounds, want="backup", window=None, busy=busy,
                                            calm_wait=args.calm)
        health = await charter.admin("GET", "/v1/admin/models")
        out["primary_circuit_at_end"] = next(
            ({k: b[k] for k in ("state", "failures", "cooldown_s", "last_reason")}
             for b in health["backends"] if b["backend"] == "primary"), None)
        added = out["circuit_open"]["added_ms"]
        out["target"] = {"value_p50_ms": added["p50"] if added else None,
                         "value_p99_ms": added["p99"] if added else None,
                         "target": f"added p50 and p99 <= {TARGET_ADDED_MS} ms while the circuit is open",
                         "meets_target": bool(added and max(added["p50"], added["p99"]) <= TARGET_ADDED_MS)}
        out["breaker"] = {"failures": 3, "cooldown_s": 5.0, "max_cooldown_s": 120.0, "probe_interval_s": 30.0,
                          "note": "Charter's defaults: a refused connection opens the circuit at once"}
        return out
    finally:
        if charter:
            charter.stop()
        primary.stop()
        backup.stop()


async def litellm_side(args: argparse.Namespace, install: Any, pinning: Pinning, tmp: Path, name: str,
                       router: dict[str, Any], n: int, rounds: int, busy: Busy, busy_pids: list[int]) -> dict[str, Any]:
    primary = start_standin(pinning, [PRIMARY_MODEL], token_delay=0.0)
    backup = start_standin(pinning, [BACKUP_MODEL], token_delay=0.0)
    proxy = None
    models = [litellm_model("primary", PRIMARY_MODEL, primary.url + "/v1"),
              litellm_model("backup", BACKUP_MODEL, backup.url + "/v1")]
    config = litellm_config(models, router={"fallbacks": [{"primary": ["backup"]}], **router})
    out: dict[str, Any] = {"config": {"router_settings": config["router_settings"]}}
    try:
        try:
            proxy = start_litellm(install, config, tmp / f"litellm-{name}", pinning)
        except StartError as exc:
            return {"ran": False, "reason": f"could not start: {exc}"}
        busy_pids[1:] = [primary.pid, backup.pid, proxy.pid]
        busy.start()
        url = proxy.url + "/v1/chat/completions"
        fail = Target("primary", url, LITELLM_MASTER_KEY, "primary", proxy.pid)
        only = Target("backup", url, LITELLM_MASTER_KEY, "backup", proxy.pid)
        async with session(1) as h:
            warm = await closed(fail, 50, h) + await closed(only, 50, h)
        out["warmup_answers_by"] = sorted({str(c.backend) for c in warm})
        m = max(n // 5, 100)
        progress(f"litellm ({name}): before the kill ({m} requests per group)")
        out["before_kill"] = await compare(fail, only, n=m, rounds=rounds, want="primary", window=None, busy=busy)
        progress(f"litellm ({name}): steady traffic, SIGKILL the primary")
        busy.start()
        out["kill"] = await kill_phase(fail, lambda: (busy.sample(), primary.kill()), workers=args.workers,
                                       think=args.think, before=0.5,
                                       after=1.0, max_after=args.litellm_window)
        out["kill"]["others_cpu_share_during"] = busy.share()
        progress(f"litellm ({name}): the primary dead (at most {args.litellm_window:g} s)")
        out["primary_dead"] = await compare(fail, only, n=m, rounds=rounds, want="backup", window=args.litellm_window,
                                            busy=busy)
        out["ran"] = True
        return out
    finally:
        if proxy:
            proxy.stop()
        primary.stop()
        backup.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    n = args.requests or (100 if quick else 2000)
    rounds = args.rounds or (2 if quick else 4)
    pinning = Pinning.plan()
    pinning.pin_self()
    doc: dict[str, Any] = {"benchmark": "failover", "quick": quick, "environment": environment(pinning)}
    tmp = Path(tempfile.mkdtemp(prefix="charter-failbench-"))
    pids = [os.getpid()]
    busy = Busy(lambda: pids)
    calm_wait = args.calm_wait if args.calm_wait is not None else (0.0 if quick else 180.0)
    args.calm = calm_wait
    try:
        doc["calm_before"] = await wait_calm(busy, max_wait=calm_wait) if calm_wait > 0 else None
        doc["charter"] = await charter_side(args, pinning, tmp, n, rounds, busy, pids)
        lite: dict[str, Any] = {"ran": False}
        if quick or args.no_litellm:
            lite["reason"] = "skipped: --quick" if quick else "skipped: --no-litellm"
        else:
            install = ensure_litellm()
            lite["version"] = install.version
            if not install.ok:
                lite["reason"] = install.reason
            else:
                lite["ran"] = True
                for name, router in (("defaults", {}), ("num_retries_0", {"num_retries": 0})):
                    if calm_wait > 0:
                        await wait_calm(busy, max_wait=calm_wait / 2)
                    lite[name] = await litellm_side(args, install, pinning, tmp, name, router, n, rounds, busy, pids)
        doc["litellm"] = lite
        c = doc["charter"]
        doc["summary"] = {
            "charter_kill_to_first_backup_answer_ms": c["kill"]["kill_to_first_backup_answer_ms"],
            "charter_client_visible_failures_after_kill": c["kill"]["client_visible_failures_after_kill"],
            "charter_circuit_open_added_ms": c["circuit_open"]["added_ms"],
            "charter_meets_target": c["target"]["meets_target"],
        }
        for name in ("defaults", "num_retries_0"):
            if lite.get(name, {}).get("ran"):
                d = lite[name]
                doc["summary"][f"litellm_{name}_kill_to_first_backup_answer_ms"] = \
                    d["kill"]["kill_to_first_backup_answer_ms"]
                doc["summary"][f"litellm_{name}_primary_dead_added_ms"] = d["primary_dead"]["added_ms"]
                doc["summary"][f"litellm_{name}_client_visible_failures_after_kill"] = \
                    d["kill"]["client_visible_failures_after_kill"]
        doc["parameters"] = {"requests_per_alias": n, "rounds": rounds, "workers": args.workers, "think_ms": args.think,
                             "litellm_window_s": args.litellm_window}
    finally:
        rmtree_quiet(tmp)
    return doc


def main() -> None:
    doc = asyncio.run(run(parse_args()))
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()

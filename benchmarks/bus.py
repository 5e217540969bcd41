"""Throughput and latency of the governed bus, each figure next to a baseline taken in the same run.

    .venv/bin/python benchmarks/bus.py            # the full run (well under a minute on 2 cores)
    .venv/bin/python benchmarks/bus.py --quick    # a smoke run: same shape, tiny counts
    .venv/bin/python benchmarks/bus.py --backend nats [--quick]   # runs benchmarks/bus_nats.py

Prints ONE JSON document on stdout; progress goes to stderr. The figures:

  a  Ed25519 verification alone (`PublicKey.verify` over pre-computed signed bytes), msgs/s.
  b  Governed publishes in process: a real Node on a temporary CHARTER_HOME, envelopes pre-sealed by
     enrolled agents, pushed through `Node.publish_batch` (verify + scope + replay + durable append).
     Reported as msgs/s and as the ratio b/a (target >= 0.8). Measured in rounds interleaved with (a)
     over the very same envelopes, so the ratio is paired and survives a noisy machine.
  c  Governed publishes over HTTP in batches against a real daemon process (`charter up`), with
     pre-sealed envelopes POSTed to /v1/publish/batch by aiohttp (target >= 5000 msgs/s). Baselines:
     the same batches from an unenrolled sender (same bytes, same HTTP, same parse; refused at the
     sender lookup, before the signature and the log) and GET /v1/health round trips.
  d  Latency of single publishes (POST /v1/publish) at an open-loop offered rate (default 1000/s):
     sends are scheduled at fixed intervals whatever the completions, and each latency runs from the
     scheduled send time to the response, so there is no coordinated omission (target p99 <= 5 ms).
     Baseline: the same open-loop run against GET /v1/health.

Machines are shared and noisy: compare ratios, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # runnable from a checkout without an editable install
    sys.path.insert(0, str(ROOT / "src"))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from charter import __version__  # noqa: E402
from charter.bus.envelope import Envelope, seal  # noqa: E402
from charter.config import Home  # noqa: E402
from charter.encoding import b64d  # noqa: E402
from charter.identity.init import init_home  # noqa: E402
from charter.identity.keys import PublicKey, SigningKey  # noqa: E402
from charter.identity.tokens import token_hash  # noqa: E402
from charter.node import Node, enroll_proof_message  # noqa: E402
from charter.server.daemon import spawn, stop  # noqa: E402

TARGET_B_RATIO = 0.8
TARGET_C_MSGS = 5000.0
TARGET_D_P99_MS = 5.0


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- setup --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The daemon's own background work, which shares its event loop with the bus (see --no-daemon-background).
BACKGROUND_SECTIONS = ("capsules", "archive")


def disable_section(text: str, section: str) -> str:
    """`enabled = false` in the TOML table `[section]`, which may or may not be in the file yet."""
    header = re.search(rf"(?m)^\[{re.escape(section)}\][ \t]*(#.*)?$", text)
    if header is None:
        return text.rstrip("\n") + f"\n\n[{section}]\nenabled = false\n"
    nxt = re.search(r"(?m)^\[", text[header.end():])
    end = header.end() + (nxt.start() if nxt else len(text) - header.end())
    body = text[header.end():end]
    if re.search(r"(?m)^enabled\s*=", body):
        body = re.sub(r"(?m)^enabled\s*=.*$", "enabled = false", body)
    else:
        body = "\nenabled = false" + body
    return text[:header.end()] + body + text[end:]


def make_home(root: Path, *, background: bool = True) -> Home:
    """A fresh CHARTER_HOME on a spare loopback port (as tests/conftest.py's make_home)."""
    home = Home(root)
    init_home(home)
    text = home.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {free_port()}", text)
    if not background:
        for section in BACKGROUND_SECTIONS:
            text = disable_section(text, section)
    home.config_path.write_text(text)
    return home


@dataclass
class BenchAgent:
    id: str
    name: str
    key: SigningKey

    @property
    def subject(self) -> str:
        return f"agents.{self.name}.events"


async def enrol_agents(node: Node, n: int) -> list[BenchAgent]:
    """Enrol `n` workers through the Node exactly as `Agent.enroll` does, minus the HTTP hop."""
    out = []
    for i in range(n):
        token, _ = await node.create_invite("worker")
        key = SigningKey.generate()
        name = f"bench{i}"
        ts = time.time_ns() // 1_000_000
        proof = key.sign_b64(enroll_proof_message(token_hash(token), name, key.public.b64, ts))
        answer = await node.enroll({"token": token, "name": name, "public_key": key.public.b64, "ts": ts, "proof": proof})
        out.append(BenchAgent(answer["charter"]["agent_id"], name, key))
    return out


def presealed(agents: Sequence[BenchAgent], n: int, payload_bytes: int, tag: str) -> list[Envelope]:
    """`n` envelopes, round-robin over the agents, sealed here: sealing is the client's cost."""
    filler = "x" * payload_bytes
    return [
        seal(a.key, sender=a.id, subject=a.subject, payload={"tag": tag, "i": i, "text": filler})
        for i in range(n)
        for a in (agents[i % len(agents)],)
    ]


def batch_body(envs: Sequence[Envelope]) -> bytes:
    return b"[" + b",".join(e.raw for e in envs) + b"]"


def chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


# -- affinity ----------------------------------------------------------------------------------


def plan_affinity(enabled: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"supported": hasattr(os, "sched_setaffinity"), "pinned": False}
    if not info["supported"]:
        info["note"] = "os.sched_setaffinity is not available; processes float over all cores"
        return info
    cores = sorted(os.sched_getaffinity(0))
    info["available_cores"] = cores
    if not enabled:
        info["note"] = "pinning disabled (--no-pin)"
        return info
    if len(cores) < 2:
        info["note"] = "fewer than 2 cores available; daemon and load generator share one"
        return info
    info.update(pinned=True, load_generator_cores=[cores[0]], daemon_cores=[cores[-1]],
                note="the benchmark process (load generator, and the in-process Node of figures a/b) "
                     f"runs on core {cores[0]}; the daemon process (every thread) on core {cores[-1]}")
    os.sched_setaffinity(0, {cores[0]})
    return info


def pin_process(pid: int, cores: list[int]) -> None:
    """Pin every thread of `pid` (sched_setaffinity on a pid touches one thread only)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, set(cores))
        except OSError:
            pass


# -- statistics --------------------------------------------------------------------------------


def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 1)) - 1))
    return sorted_values[k]


def r(x: float, nd: int = 1) -> float:
    return round(float(x), nd)


class Budget:
    """A soft wall-clock budget: optional extra rounds are skipped when they would overrun it."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, next_cost: float, reserve: float) -> bool:
        return self.elapsed() + next_cost + reserve <= self.seconds


class CpuWatch:
    """How busy each core was during a phase, and how much of that was not this benchmark.

    `foreign_cores` is CPU used by other processes on the machine (in cores): on a shared machine it
    says how much the figures of that phase can be trusted.
    """

    def __init__(self) -> None:
        self.pids: list[int] = [os.getpid()]
        self._t0 = 0.0
        self._sys: Any = None
        self._procs: dict[int, float] = {}

    @staticmethod
    def _proc_cpu(pid: int) -> float:
        try:
            import psutil

            t = psutil.Process(pid).cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - a process that is gone used nothing more
            return 0.0

    def start(self) -> None:
        import psutil

        self._t0 = time.perf_counter()
        self._sys = psutil.cpu_times(percpu=True)
        self._procs = {pid: self._proc_cpu(pid) for pid in self.pids}

    def stop(self) -> dict[str, Any]:
        import psutil

        wall = time.perf_counter() - self._t0
        now = psutil.cpu_times(percpu=True)

        def busy(t: Any) -> float:
            return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0) - getattr(t, "guest", 0.0) \
                - getattr(t, "guest_nice", 0.0)

        per_core = [(busy(b) - busy(a)) / wall for a, b in zip(self._sys, now, strict=True)]
        ours = sum(self._proc_cpu(pid) - t for pid, t in self._procs.items()) / wall
        steal = sum(getattr(b, "steal", 0.0) - getattr(a, "steal", 0.0) for a, b in zip(self._sys, now, strict=True)) / wall
        return {"seconds": r(wall, 2), "cores_busy": [r(x, 2) for x in per_core], "benchmark_cores": r(ours, 2),
                "foreign_cores": r(max(0.0, sum(per_core) - ours), 2), "steal_cores": r(steal, 2)}


# -- figures a and b: in process ---------------------------------------------------------------


def time_verify(pairs: Sequence[tuple[PublicKey, bytes, bytes]]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    ok = 0
    for pk, sig, data in pairs:
        ok += pk.verify(sig, data)
    dt = time.perf_counter() - t0
    if ok != len(pairs):
        raise RuntimeError(f"verification failed for {len(pairs) - ok} envelopes")
    return dt


async def time_publish(node: Node, items: Sequence[Any], batch: int) -> float:
    batches = chunks(items, batch)
    gc.collect()
    t0 = time.perf_counter()
    accepted = 0
    for b in batches:
        outcomes = await node.publish_batch(b)
        accepted += sum(1 for o in outcomes if o.receipt)
    dt = time.perf_counter() - t0
    if accepted != len(items):
        raise RuntimeError(f"only {accepted} of {len(items)} envelopes were accepted in process")
    return dt


async def bench_in_process(args: argparse.Namespace, workdir: Path, budget: Budget, reserve: float) -> dict[str, Any]:
    watch = CpuWatch()
    home = make_home(workdir / "inproc")
    node = Node(home)
    await node.start()
    try:
        agents = await enrol_agents(node, args.agents)
        keys = {a.id: a.key.public for a in agents}
        n = args.msgs_per_round
        # Warm-up: first touches of the log, the scope memo, the allocator.
        warm = presealed(agents, min(n, 500), args.payload_bytes, "warm")
        time_verify([(keys[e.sender], b64d(e.sig), e.signed) for e in warm])
        await time_publish(node, warm, args.batch)

        rounds: list[dict[str, float]] = []
        watch.start()
        for i in range(args.rounds):
            t_round = time.monotonic()
            envs = presealed(agents, n, args.payload_bytes, f"b{i}")
            raws = [e.raw for e in presealed(agents, n, args.payload_bytes, f"bb{i}")]
            pairs = [(keys[e.sender], b64d(e.sig), e.signed) for e in envs]
            res: dict[str, float] = {}

            async def run_a() -> None:
                res["a"] = n / time_verify(pairs)

            async def run_b() -> None:
                res["b"] = n / await time_publish(node, envs, args.batch)

            async def run_bp() -> None:
                res["b_parse"] = n / await time_publish(node, raws, args.batch)

            order = [run_a, run_b, run_bp] if i % 2 == 0 else [run_bp, run_b, run_a]
            for step in order:
                await step()
            res["ratio"] = res["b"] / res["a"]
            res["ratio_parse"] = res["b_parse"] / res["a"]
            rounds.append(res)
            progress(f"a/b round {i + 1}: verify {res['a']:,.0f}/s  publish_batch {res['b']:,.0f}/s "
                     f"(ratio {res['ratio']:.3f})  from bytes {res['b_parse']:,.0f}/s")
            if i + 1 < args.rounds and not budget.allows(time.monotonic() - t_round, reserve):
                progress("a/b: the time budget is short; skipping the remaining rounds")
                break
        cpu = watch.stop()
        seq, _ = await node.log.head()
    finally:
        await node.close()
    med = statistics.median
    a_val, b_val = med(x["a"] for x in rounds), med(x["b"] for x in rounds)
    ratio = med(x["ratio"] for x in rounds)
    ratio_parse = med(x["ratio_parse"] for x in rounds)
    return {
        "rounds": rounds, "a": a_val, "b": b_val, "ratio": ratio,
        "b_parse": med(x["b_parse"] for x in rounds), "ratio_parse": ratio_parse, "log_entries": seq,
        "cpu": cpu,
    }


# -- figures c and d: over HTTP against a daemon process --------------------------------------


async def closed_loop(n_requests: int, concurrency: int, do: Callable[[int], Awaitable[int]]) -> tuple[float, int]:
    """`concurrency` workers issue requests 0..n-1 back to back; returns (seconds, messages)."""
    it = iter(range(n_requests))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in it:
            n = await do(i)  # not `done += await ...`: that reads `done` before the await
            done += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, done


@dataclass
class Samples:
    latency_ms: list[float]
    lag_ms: list[float]
    errors: int
    wall_s: float


async def open_loop(n: int, rate: float, do: Callable[[int], Awaitable[None]], *, spin: bool) -> Samples:
    """Send request i at t0 + i/rate whatever happened before; latency = response - scheduled time.

    `spin`: loop timers are millisecond-grained, so sleep most of each gap and spin on the loop for
    the rest; only worth it (and only fair to the daemon) when the load generator has its own core.
    """
    interval = 1.0 / rate
    lat = [0.0] * n
    lag = [0.0] * n
    errors = 0
    tasks = []

    async def one(i: int, sched: float) -> None:
        nonlocal errors
        lag[i] = time.perf_counter() - sched
        try:
            await do(i)
        except Exception:  # noqa: BLE001 - counted and reported, never hidden
            errors += 1
        lat[i] = time.perf_counter() - sched

    loop = asyncio.get_running_loop()
    gc.collect()
    t0 = time.perf_counter() + 0.01
    i = 0
    while i < n:
        now = time.perf_counter()
        while i < n and t0 + i * interval <= now:
            tasks.append(loop.create_task(one(i, t0 + i * interval)))
            i += 1
        if i < n:
            delay = t0 + i * interval - time.perf_counter()
            if spin:
                await asyncio.sleep(delay - 0.0015 if delay > 0.002 else 0)
            elif delay > 0:
                await asyncio.sleep(delay)
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return Samples([x * 1000 for x in lat], [x * 1000 for x in lag], errors, wall)


def summarise(runs: Sequence[Samples], rate: float) -> dict[str, Any]:
    """Percentiles over every sample of every run (pooled), and each run's p99 for the spread."""
    ms = sorted(x for s in runs for x in s.latency_ms)
    lags = sorted(x for s in runs for x in s.lag_ms)
    n = len(ms)
    return {
        "requests": n, "errors": sum(s.errors for s in runs), "offered_rate_per_s": rate,
        "achieved_rate_per_s": r(n / sum(s.wall_s for s in runs)),
        "p50_ms": r(pct(ms, 0.50), 3), "p90_ms": r(pct(ms, 0.90), 3), "p99_ms": r(pct(ms, 0.99), 3),
        "p999_ms": r(pct(ms, 0.999), 3), "max_ms": r(ms[-1], 3), "mean_ms": r(statistics.fmean(ms), 3),
        "p99_ms_per_round": [r(pct(sorted(s.latency_ms), 0.99), 3) for s in runs],
        "send_lag_p99_ms": r(pct(lags, 0.99), 3), "send_lag_max_ms": r(lags[-1], 3),
    }


async def bench_http(args: argparse.Namespace, workdir: Path, affinity: dict[str, Any], budget: Budget) -> dict[str, Any]:
    home = make_home(workdir / "daemon", background=not args.no_daemon_background)
    node = Node(home)  # enrol before the daemon starts; it loads the registry from the database
    await node.start()
    agents = await enrol_agents(node, args.agents)
    await node.close()

    progress("starting the daemon (python -m charter up)")
    info = spawn(home)
    pid, url = info["pid"], info["url"]
    if affinity.get("pinned"):
        pin_process(pid, affinity["daemon_cores"])
    watch = CpuWatch()
    watch.pids.append(pid)
    try:
        # An enrolled-looking sender that is not enrolled: the gate refuses it at the lookup.
        stranger = [BenchAgent("agt_01BENCHNOTENROLLED0000000", "stranger", SigningKey.generate())]
        batch = args.batch
        connector = aiohttp.TCPConnector(limit=256, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            headers = {"Content-Type": "application/json"}
            if affinity.get("pinned"):  # threads the daemon started after the first pass
                pin_process(pid, affinity["daemon_cores"])

            async def post_batch(body: bytes, expect: int) -> int:
                async with session.post(url + "/v1/publish/batch", data=body, headers=headers) as resp:
                    doc = orjson.loads(await resp.read())
                    if resp.status != 200 or doc["accepted"] != expect:
                        raise RuntimeError(f"batch answer {resp.status}: {str(doc)[:300]}")
                    return doc["accepted"] + doc["rejected"]

            async def health(_: int = 0) -> int:
                async with session.get(url + "/v1/health") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"health answered {resp.status}")
                    return 1

            # -- c: batched publishes, interleaved with their baselines, in rounds ------------------
            reject_body = batch_body(presealed(stranger, batch, args.payload_bytes, "rejected"))
            warm = [batch_body(b) for b in chunks(presealed(agents, 10 * batch, args.payload_bytes, "warm"), batch)]
            await closed_loop(len(warm), args.concurrency, lambda i: post_batch(warm[i], batch))
            await closed_loop(20, args.concurrency, lambda i: post_batch(reject_body, 0))
            await closed_loop(50, args.concurrency, health)

            n_req = max(1, args.http_msgs // batch)
            reserve_d = 2 * (args.latency_seconds + 1.0) + 2.0
            c_rounds: list[dict[str, float]] = []
            watch.start()
            for i in range(args.http_rounds):
                t_round = time.monotonic()
                bodies = [batch_body(b) for b in chunks(presealed(agents, n_req * batch, args.payload_bytes, f"c{i}"), batch)]
                gc.collect()
                dt, msgs = await closed_loop(n_req, args.concurrency, lambda k: post_batch(bodies[k], batch))
                c = msgs / dt
                gc.collect()
                dt, msgs = await closed_loop(n_req, args.concurrency, lambda k: post_batch(reject_body, 0))
                rej = msgs / dt
                gc.collect()
                dt, reqs = await closed_loop(n_req, args.concurrency, health)
                hl = reqs / dt
                c_rounds.append({"c": c, "rejected_batch": rej, "health": hl, "ratio": c / rej})
                progress(f"c round {i + 1}: publish/batch {c:,.0f} msgs/s; rejected batch {rej:,.0f} msgs/s; "
                         f"health {hl:,.0f} req/s")
                if i + 1 < args.http_rounds and not budget.allows(time.monotonic() - t_round, reserve_d):
                    progress("c: the time budget is short; skipping the remaining rounds")
                    break
            c_cpu = watch.stop()

            # -- d: open-loop single publishes, alternating with the same schedule against /v1/health --
            per_round = max(1, int(args.rate * args.latency_seconds / args.latency_rounds))
            warm_n = max(1, int(args.rate * 0.5))
            singles = [e.raw for e in presealed(agents, warm_n + per_round * args.latency_rounds,
                                               args.payload_bytes, "d")]
            next_single = 0
            spin = bool(affinity.get("pinned"))

            async def publish_one(_: int) -> None:
                nonlocal next_single
                body = singles[next_single]
                next_single += 1
                async with session.post(url + "/v1/publish", data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 201:
                        raise RuntimeError(f"publish answered {resp.status}")

            async def health_one(_: int) -> None:
                await health()

            await open_loop(warm_n, args.rate, publish_one, spin=spin)  # warm: connections and the daemon
            progress(f"d: {args.latency_rounds} x ({per_round} single publishes, then {per_round} GET /v1/health) "
                     f"at {args.rate:g}/s, open loop")
            pub_runs: list[Samples] = []
            health_runs: list[Samples] = []
            watch.start()
            for _ in range(args.latency_rounds):
                pub_runs.append(await open_loop(per_round, args.rate, publish_one, spin=spin))
                health_runs.append(await open_loop(per_round, args.rate, health_one, spin=spin))
            d_cpu = watch.stop()
            d_pub, d_health = summarise(pub_runs, args.rate), summarise(health_runs, args.rate)
            d_pub["scheduler"] = d_health["scheduler"] = "sleep, then spin" if spin else "sleep"
            progress(f"d: publish p50 {d_pub['p50_ms']} ms, p99 {d_pub['p99_ms']} ms; "
                     f"health p50 {d_health['p50_ms']} ms, p99 {d_health['p99_ms']} ms")
        daemon_cpu = None
        try:
            import psutil

            t = psutil.Process(pid).cpu_times()
            daemon_cpu = r(t.user + t.system, 2)
        except Exception:  # noqa: BLE001 - informational only
            pass
    finally:
        stop(home)
    med = statistics.median
    return {
        "c_rounds": c_rounds,
        "c": med(x["c"] for x in c_rounds),
        "c_rejected": med(x["rejected_batch"] for x in c_rounds),
        "c_health": med(x["health"] for x in c_rounds),
        "c_ratio": med(x["ratio"] for x in c_rounds),
        "d_publish": d_pub, "d_health": d_health, "daemon_cpu_s": daemon_cpu, "daemon_pid": pid,
        "c_cpu": c_cpu, "d_cpu": d_cpu,
    }


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a fast smoke run: tiny counts, same shape of output")
    p.add_argument("--agents", type=int, default=4, help="enrolled agents the envelopes come from (default 4)")
    p.add_argument("--batch", type=int, default=100, help="envelopes per batch for b and c (default 100)")
    p.add_argument("--payload-bytes", type=int, default=128, help="size of the text in each payload (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved a/b rounds (default 5)")
    p.add_argument("--msgs-per-round", type=int, default=5000, help="envelopes per a/b round (default 5000)")
    p.add_argument("--http-rounds", type=int, default=3, help="c rounds, each with its baselines (default 3)")
    p.add_argument("--http-msgs", type=int, default=10000, help="envelopes per c round (default 10000)")
    p.add_argument("--concurrency", type=int, default=4, help="batch requests in flight for c (default 4)")
    p.add_argument("--rate", type=float, default=1000.0, help="offered rate for d, requests/s (default 1000)")
    p.add_argument("--latency-seconds", type=float, default=4.0,
                   help="seconds of open-loop load in d, for publish and again for health (default 4)")
    p.add_argument("--latency-rounds", type=int, default=4,
                   help="d alternates publish and health runs this many times (default 4)")
    p.add_argument("--budget", type=float, default=55.0,
                   help="soft wall-clock budget in seconds; optional extra rounds are skipped to keep it (default 55)")
    p.add_argument("--no-daemon-background", action="store_true",
                   help="turn the daemon's capsule builder and archivist off ([capsules] and [archive] enabled = "
                        "false), to tell the bus's own latency from theirs")
    p.add_argument("--no-pin", action="store_true", help="do not pin the daemon and the load generator to cores")
    p.add_argument("--dir", default=None, help="where to make the temporary homes (default: the system temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.agents = min(args.agents, 2)
        args.rounds, args.msgs_per_round = 2, 400
        args.http_rounds, args.http_msgs = 1, 1000
        args.latency_seconds, args.latency_rounds = 0.5, 1
        args.budget = min(args.budget, 20.0)
    for name in ("agents", "batch", "rounds", "msgs_per_round", "http_rounds", "http_msgs", "concurrency",
                 "latency_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.latency_seconds <= 0:
        p.error("--rate and --latency-seconds must be positive")
    return args


def fs_type(path: Path) -> str | None:
    try:
        import psutil

        best = None
        for part in psutil.disk_partitions(all=True):
            if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
                best = part
        return best.fstype if best else None
    except Exception:  # noqa: BLE001 - informational only
        return None


async def run(args: argparse.Namespace, affinity: dict[str, Any], workdir: Path) -> dict[str, Any]:
    budget = Budget(args.budget)
    reserve_http = 2 * (args.latency_seconds + 1.0) + 6.0 + 2.0 * args.http_msgs / TARGET_C_MSGS
    progress("a/b: in-process Node, interleaved verify-only and publish_batch rounds")
    ab = await bench_in_process(args, workdir, budget, reserve_http)
    http = await bench_http(args, workdir, affinity, budget)

    b_ok = ab["ratio"] >= TARGET_B_RATIO
    c_ok = http["c"] >= TARGET_C_MSGS
    d_ok = http["d_publish"]["p99_ms"] <= TARGET_D_P99_MS and http["d_publish"]["errors"] == 0
    dp, dh = http["d_publish"], http["d_health"]
    figures = {
        "a_verify_only": {
            "what": "Ed25519 PublicKey.verify over the pre-computed signed bytes of the envelopes used in b",
            "value": r(ab["a"]), "unit": "msgs/s",
            "baseline": None,
            "ratio": 1.0, "ratio_means": "a / a: this figure is the reference for b",
            "target": None, "meets_target": None,
            "rounds": [r(x["a"]) for x in ab["rounds"]],
        },
        "b_publish_in_process": {
            "what": f"Node.publish_batch of pre-sealed Envelope objects in batches of {args.batch}: "
                    "verify + scope + replay + durable SQLite append",
            "value": r(ab["b"]), "unit": "msgs/s",
            "baseline": {"name": "a_verify_only", "value": r(ab["a"]), "unit": "msgs/s"},
            "ratio": r(ab["ratio"], 3), "ratio_means": "b / a, the median of per-round paired ratios",
            "target": {"ratio": f">= {TARGET_B_RATIO}"}, "meets_target": b_ok,
            "rounds": [r(x["b"]) for x in ab["rounds"]],
            "ratios": [r(x["ratio"], 3) for x in ab["rounds"]],
            "from_bytes": {
                "what": "the same, but the batch holds the wire bytes, so envelope.parse runs too",
                "value": r(ab["b_parse"]), "unit": "msgs/s", "ratio_to_a": r(ab["ratio_parse"], 3),
            },
            "log_entries": ab["log_entries"],
        },
        "c_publish_http_batch": {
            "what": f"POST /v1/publish/batch, {args.batch} pre-sealed envelopes per request, "
                    f"{args.concurrency} requests in flight, aiohttp against a daemon process",
            "value": r(http["c"]), "unit": "msgs/s",
            "baseline": {
                "name": "rejected_batch",
                "what": "the same batches from a sender that is not enrolled: same bytes, HTTP and parse; "
                        "refused at the sender lookup, before signature verification and the log",
                "value": r(http["c_rejected"]), "unit": "msgs/s",
                "health_round_trips_per_s": r(http["c_health"]),
                "health_what": "GET /v1/health with the same concurrency: the bare HTTP round trip",
            },
            "ratio": r(http["c_ratio"], 3), "ratio_means": "c / baseline (median of per-round paired ratios)",
            "ratio_to_b": r(http["c"] / ab["b"], 3),
            "target": {"msgs_per_s": f">= {TARGET_C_MSGS:g}"}, "meets_target": c_ok,
            "rounds": [{k: r(v, 3 if k == "ratio" else 1) for k, v in x.items()} for x in http["c_rounds"]],
        },
        "d_publish_http_single_latency": {
            "what": f"POST /v1/publish, one envelope per request, open loop at {args.rate:g}/s for "
                    f"{args.latency_seconds:g}s; latency from the scheduled send time to the response",
            "value": dp["p99_ms"], "unit": "ms (p99)",
            "p50_ms": dp["p50_ms"], "p99_ms": dp["p99_ms"],
            "baseline": {"name": "health_open_loop", "what": "GET /v1/health on the same schedule",
                         "value": dh["p99_ms"], "unit": "ms (p99)", "p50_ms": dh["p50_ms"], "p99_ms": dh["p99_ms"]},
            "ratio": r(dp["p99_ms"] / dh["p99_ms"], 3) if dh["p99_ms"] > 0 else None,
            "ratio_means": "publish p99 / health p99",
            "target": {"p99_ms": f"<= {TARGET_D_P99_MS:g}"}, "meets_target": d_ok,
            "detail": dp, "baseline_detail": dh,
        },
    }
    return {
        "benchmark": "charter bus",
        "charter_version": __version__,
        "quick": args.quick,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "storage": {"dir": str(workdir), "filesystem": fs_type(workdir), "synchronous": "normal (the default)"},
        "client": {"http": f"aiohttp {aiohttp.__version__}", "event_loop": type(asyncio.get_running_loop()).__module__},
        "params": {k: getattr(args, k) for k in ("agents", "batch", "payload_bytes", "rounds", "msgs_per_round",
                                                 "http_rounds", "http_msgs", "concurrency", "rate",
                                                 "latency_seconds", "latency_rounds", "budget",
                                                 "no_daemon_background")},
        "cpu_during": {
            "note": "per phase: how busy each core was; foreign_cores is CPU used by other processes on the "
                    "machine (in cores). Well above 0 means the phase shared its cores and its figures are noisy.",
            "a_b": ab["cpu"], "c": http["c_cpu"], "d": http["d_cpu"],
        },
        "figures": figures,
        "targets_met": {k: v["meets_target"] for k, v in figures.items() if v["target"] is not None},
        "all_targets_met": b_ok and c_ok and d_ok,
        "daemon_cpu_seconds": http["daemon_cpu_s"],
        "elapsed_s": r(budget.elapsed(), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    raw, backend = list(sys.argv[1:] if argv is None else argv), "sqlite"
    for i, a in enumerate(raw):  # --backend nats: the log on JetStream, in benchmarks/bus_nats.py
        if a.startswith("--backend="):
            backend = a.split("=", 1)[1]
            del raw[i]
            break
        if a == "--backend" and i + 1 < len(raw):
            backend = raw[i + 1]
            del raw[i:i + 2]
            break
    if backend == "nats":
        import bus_nats

        return bus_nats.main(raw)
    if backend != "sqlite":
        sys.exit("--backend is sqlite (this file's figures) or nats (benchmarks/bus_nats.py)")
    args = parse_args(raw)
    affinity = plan_affinity(not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="charter-bench-", dir=args.dir))
    try:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            doc = runner.run(run(args, affinity, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The governed bus on NATS JetStream, next to raw JetStream publishes measured in the same run.

    .venv/bin/python benchmarks/bus_nats.py            # the full run (about a minute on 2 cores)
    .venv/bin/python benchmarks/bus_nats.py --quick    # a smoke run: same shape, tiny counts
    .venv/bin/python benchmarks/bus.py --backend nats  # the same thing

Prints ONE JSON document on stdout; progress goes to stderr. Rounds interleave each governed figure
with its raw baseline over envelopes of the same size, so each ratio is paired.

  batch   governed: `Node.publish_batch` of pre-sealed envelopes in batches of --batch, on a Node whose
          log is a NATS stream (verify + scope + replay + chain + one JetStream message per batch,
          published with Nats-Expected-Last-Sequence and acknowledged). Raw: `js.publish` of one message
          of the same bytes per batch, acknowledged, no Charter at all.
  single  governed: `Node.publish` of single envelopes from --concurrency tasks at once (appends that
          meet in flight share a JetStream message: group commit). Raw: `js.publish` of each envelope
          as its own message from the same number of tasks, each waiting for its acknowledgement.
  ingest  (operator mode: a nats-server of its own on a spare loopback port, Charter as its operator)
          governed: agents publish signed envelopes on NATS (`in.<subject>`, request/reply with their
          user JWTs); the Node's bridge verifies, appends to the JetStream log and answers with the
          receipt. Raw: the same clients publishing the same bytes straight into a JetStream stream
          (`js.publish`, acknowledged) on the same server, with the same concurrency.

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
import subprocess
import sys
import tempfile
import time
import uuid
from collections import UserString
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT / "src"), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import nats  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402

from bus import CpuWatch, chunks, enrol_agents, presealed, progress, r  # noqa: E402
from charter import __version__  # noqa: E402
from charter.bus.log.nats import NatsLog, encode_message  # noqa: E402
from charter.bus.nats_auth import NatsAuthority, creds_text, user_seed  # noqa: E402
from charter.config import Home  # noqa: E402
from charter.encoding import b64d  # noqa: E402
from charter.identity.init import init_home  # noqa: E402
from charter.node import Node  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_home(root: Path, url: str, stream: str, *, agents: bool = False) -> Home:
    home = Home(root)
    init_home(home)
    text = home.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {free_port()}", text)
    extra = f'backend = "nats"\nnats_url = "{url}"\nstream = "{stream}"\n'
    if agents:
        extra += 'nats_creds = "nats/charter.creds"\nnats_agents = true\n'
    text = text.replace("[bus]\n", "[bus]\n" + extra, 1)
    for section in ("capsules", "archive"):  # background work off: the figures are the bus's alone
        if re.search(rf"(?m)^\[{section}\]$", text):
            text = re.sub(rf"(?m)^(\[{section}\]\n(?:#.*\n)*)enabled = true", r"\1enabled = false", text)
        else:
            text += f"\n[{section}]\nenabled = false\n"
    home.config_path.write_text(text)
    return home


async def paired(rounds: int, figures: dict[str, Callable[[int], Awaitable[float]]]) -> list[dict[str, float]]:
    """Each round runs every figure once, in alternating order; returns msgs/s per figure per round."""
    out = []
    names = list(figures)
    for i in range(rounds):
        res: dict[str, float] = {}
        for name in (names if i % 2 == 0 else names[::-1]):
            gc.collect()
            res[name] = await figures[name](i)
        out.append(res)
        progress("round %d: %s" % (i + 1, "  ".join(f"{k} {v:,.0f}/s" for k, v in res.items())))
    return out


async def run_tasks(n_tasks: int, items: Sequence[Any], do: Callable[[Any], Awaitable[Any]]) -> float:
    it = iter(items)

    async def worker() -> None:
        for x in it:
            await do(x)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_tasks)))
    return time.perf_counter() - t0


# -- batch and single, against the JetStream server the machine runs --------------------------------


async def bench_shared(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stream = "BENCH" + uuid.uuid4().hex[:12].upper()
    home = nats_home(workdir / "shared", args.url, stream)
    node = Node(home)
    await node.start()
    nc = await nats.connect(args.url)
    js = nc.jetstream(timeout=10)
    raw_stream = stream + "_RAW"
    await js.add_stream(StreamConfig(name=raw_stream, subjects=[f"bench.{raw_stream}"], storage=StorageType.FILE))
    watch = CpuWatch()
    try:
        agents = await enrol_agents(node, args.agents)
        n = args.msgs
        fake = (b"\x00" * 32, b"\x00" * 16)

        async def governed_batch(i: int) -> float:
            envs = presealed(agents, n, args.payload_bytes, f"gb{i}")
            t0 = time.perf_counter()
            for b in chunks(envs, args.batch):
                outs = await node.publish_batch(b)
                assert all(o.receipt for o in outs)
            return n / (time.perf_counter() - t0)

        async def raw_batch(i: int) -> float:
            envs = presealed(agents, n, args.payload_bytes, f"rb{i}")
            bodies = [encode_message(fake[1], 1, 0, fake[0], [(fake[0], e.raw) for e in b])
                      for b in chunks(envs, args.batch)]
            t0 = time.perf_counter()
            for body in bodies:
                await js.publish(f"bench.{raw_stream}", body)
            return n / (time.perf_counter() - t0)

        keys = {a.id: a.key.public for a in agents}

        async def verify_only(i: int) -> float:  # what the governed figures cannot beat: Ed25519 per envelope
            envs = presealed(agents, n, args.payload_bytes, f"v{i}")
            pairs = [(keys[e.sender], b64d(e.sig), e.signed) for e in envs]
            t0 = time.perf_counter()
            for pk, sig, data in pairs:
                pk.verify(sig, data)
            return n / (time.perf_counter() - t0)

        async def governed_single(i: int) -> float:
            envs = presealed(agents, n, args.payload_bytes, f"gs{i}")
            return n / await run_tasks(args.concurrency, envs, node.publish)

        async def raw_single(i: int) -> float:
            envs = presealed(agents, n, args.payload_bytes, f"rs{i}")
            return n / await run_tasks(args.concurrency, envs, lambda e: js.publish(f"bench.{raw_stream}", e.raw))

        await governed_batch(-1)  # warm-up
        await raw_batch(-1)
        watch.start()
        rounds = await paired(args.rounds, {"verify_only": verify_only, "governed_batch": governed_batch,
                                            "raw_batch": raw_batch,
                                            "governed_single": governed_single, "raw_single": raw_single})
        cpu = watch.stop()
        log: NatsLog = node.log
        report = await log.verify()
        messages = (await js.stream_info(stream)).state.last_seq
    finally:
        await node.close()
        for s in (stream, f"KV_{stream}_consumers", raw_stream):
            try:
                await js.delete_stream(s)
            except Exception:  # noqa: BLE001
                pass
        await nc.close()
    return {"rounds": rounds, "cpu": cpu, "log_entries": report.checked, "log_ok": report.ok,
            "stream_messages": messages}


# -- ingest: agents on NATS, Charter as the operator ------------------------------------------------


async def bench_ingest(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server_bin = shutil.which("nats-server") or "/usr/sbin/nats-server"
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    home = nats_home(workdir / "ingest", url, "CHARTER", agents=True)
    auth = NatsAuthority.create(home.root / "nats")
    files = auth.write_files(listen=f"127.0.0.1:{port}", store_dir=workdir / "ingest-js",
                             resolver_dir=workdir / "ingest-resolver")
    proc = subprocess.Popen([server_bin, "-c", str(files["server.conf"])], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    clients: list[Any] = []
    node = None
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        node = Node(home)
        await node.start()
        agents = await enrol_agents(node, args.agents)
        for a in agents:
            info = node.nats.issue(node.registry.get(a.id))
            clients.append(await nats.connect(url, user_credentials=UserString(creds_text(info["jwt"], user_seed(
                a.key.seed()))), inbox_prefix=info["inbox_prefix"]))
        svc = await nats.connect(url, user_credentials=UserString(auth.service_creds()))
        svc_js = svc.jetstream(timeout=10)
        await svc_js.add_stream(StreamConfig(name="RAW", subjects=["rawbench.x"], storage=StorageType.FILE))
        n = args.msgs
        by_agent = {a.id: k for k, a in enumerate(agents)}

        async def governed(i: int) -> float:
            envs = presealed(agents, n, args.payload_bytes, f"gi{i}")

            async def one(e: Any) -> None:
                msg = await clients[by_agent[e.sender]].request(f"in.{e.subject}", e.raw, timeout=10)
                if b'"error"' in msg.data:
                    raise RuntimeError(msg.data[:300])

            return n / await run_tasks(args.concurrency, envs, one)

        async def raw(i: int) -> float:
            envs = presealed(agents, n, args.payload_bytes, f"ri{i}")
            return n / await run_tasks(args.concurrency, envs,
                                       lambda e: svc_js.publish("rawbench.x", e.raw))

        await governed(-1)
        await raw(-1)
        watch = CpuWatch()
        watch.start()
        rounds = await paired(args.rounds, {"governed_ingest": governed, "raw_ingest": raw})
        cpu = watch.stop()
        await svc.close()
        return {"rounds": rounds, "cpu": cpu, "nats_server": subprocess.run([server_bin, "--version"],
                                                                             capture_output=True, text=True).stdout.strip()}
    finally:
        for c in clients:
            await c.close()
        if node is not None:
            await node.close()
        proc.terminate()
        proc.wait(10)


def figure(rounds: list[dict[str, float]], gov: str, raw: str, what: str, raw_what: str) -> dict[str, Any]:
    med = statistics.median
    return {
        "what": what, "value": r(med(x[gov] for x in rounds)), "unit": "msgs/s",
        "baseline": {"what": raw_what, "value": r(med(x[raw] for x in rounds)), "unit": "msgs/s"},
        "ratio": r(med(x[gov] / x[raw] for x in rounds), 3),
        "ratio_means": "governed / raw, the median of per-round paired ratios",
        "rounds": [{"governed": r(x[gov]), "raw": r(x[raw])} for x in rounds],
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    progress(f"batch and single against {args.url}")
    shared = await bench_shared(args, workdir)
    ingest = None
    if not args.no_ingest:
        progress("ingest: a nats-server of its own in operator mode")
        ingest = await bench_ingest(args, workdir)
    b, c = args.batch, args.concurrency
    figures = {
        "batch": figure(shared["rounds"], "governed_batch", "raw_batch",
                        f"Node.publish_batch, {b} envelopes per call, NATS log (chain, expected-last-sequence, ack)",
                        f"js.publish of one message of the same bytes per {b} envelopes, acknowledged"),
        "single": figure(shared["rounds"], "governed_single", "raw_single",
                         f"Node.publish of one envelope, {c} tasks at once (group commit into shared messages)",
                         f"js.publish of each envelope as its own message, {c} tasks at once, acknowledged"),
    }
    figures["batch"]["ratio_to_verify_only"] = r(statistics.median(
        x["governed_batch"] / x["verify_only"] for x in shared["rounds"]), 3)
    figures["batch"]["verify_only"] = {
        "what": "Ed25519 PublicKey.verify alone over the same envelopes: the ceiling of any governed figure",
        "value": r(statistics.median(x["verify_only"] for x in shared["rounds"])), "unit": "msgs/s"}
    if ingest:
        figures["ingest"] = figure(ingest["rounds"], "governed_ingest", "raw_ingest",
                                   f"agents publish signed envelopes on NATS (in.<subject>, request/reply, user JWTs), "
                                   f"{c} in flight; Charter verifies, appends, answers with the receipt",
                                   f"the same bytes published into a JetStream stream on the same server, {c} in "
                                   "flight, acknowledged")
    return {
        "benchmark": "charter bus on nats",
        "charter_version": __version__,
        "quick": args.quick,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "nats": {"shared_url": args.url, "ingest_server": ingest and ingest["nats_server"]},
        "params": {k: getattr(args, k) for k in ("agents", "batch", "payload_bytes", "rounds", "msgs", "concurrency")},
        "log": {"entries": shared["log_entries"], "verified": shared["log_ok"],
                "jetstream_messages": shared["stream_messages"]},
        "cpu_during": {"note": "foreign_cores: CPU used by other processes on the machine (in cores)",
                       "shared": shared["cpu"], "ingest": ingest and ingest["cpu"]},
        "figures": figures,
        "elapsed_s": r(time.monotonic() - t0, 1),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a fast smoke run: tiny counts, same shape of output")
    p.add_argument("--url", default="nats://127.0.0.1:4222", help="the JetStream server for batch and single")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--payload-bytes", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--msgs", type=int, default=5000, help="envelopes per figure per round (default 5000)")
    p.add_argument("--concurrency", type=int, default=32, help="tasks in flight for single and ingest (default 32)")
    p.add_argument("--no-ingest", action="store_true", help="skip the operator-mode ingest figure")
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.agents, args.rounds, args.msgs = 2, 1, 300
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="charter-bench-nats-", dir=args.dir))
    try:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            doc = runner.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

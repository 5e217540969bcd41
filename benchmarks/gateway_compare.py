"""The gateway's added latency, this checkout against another revision, measured side by side.

On a shared VM the same code gives +0.6 ms one minute and +1.3 ms the next at one request at a
time: two runs of `gateway.py` cannot tell a 0.1 ms change from the weather. This runs both at
once instead: one stand-in backend, two daemons (`charter up` from this checkout, and from REV
checked out into a temporary git worktree), and the requests in interleaved rounds (direct,
REV, this checkout; reversed every other round), so that both meet the same neighbours.

    .venv/bin/python benchmarks/gateway_compare.py --against HEAD~1 [--concurrency 16] [--stream] [--priced]

Prints one JSON document: each side's added p50/p90/p99 over the direct calls, its CPU per call,
and this checkout's figures as a ratio of REV's (below 1: this checkout is faster). Pinning as in
gateway.py: the daemons on the last core (one at a time is busy), load and backend on the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gwlib import (
    ROLE_NO_BUDGET,
    ROOT,
    Busy,
    Pinning,
    Target,
    charter_home,
    closed_loop,
    environment,
    progress,
    r3,
    rmtree_quiet,
    session,
    start_charter,
    start_standin,
    wait_calm,
)

from gateway import added, figure

MODEL = "bench-model"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="HEAD", help="the revision to compare with (default HEAD: the last commit)")
    p.add_argument("--requests", type=int, default=None, help="requests per target (default 4000; 60 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10; 2 with --quick)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight per target (default 1)")
    p.add_argument("--stream", action="store_true", help="streamed answers instead of whole ones")
    p.add_argument("--priced", action="store_true", help="a priced model and an agent with a budget (reserve + settle)")
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the shape only")
    return p.parse_args()


@contextmanager
def worktree(rev: str) -> Iterator[tuple[Path, str]]:
    """REV checked out (detached) in a temporary git worktree; removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="charter-compare-"))
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise SystemExit(f"gateway_compare: {rev!r} is not a revision of {ROOT}: {commit.stderr.strip()}")
    sha = commit.stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(where / "tree"), sha], cwd=ROOT, check=True)
    try:
        yield where / "tree", sha
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where / "tree")], cwd=ROOT, capture_output=True)
        rmtree_quiet(where)


@contextmanager
def python_path(src: Path | None) -> Iterator[None]:
    """The daemon spawned inside imports Charter from `src` (None: this checkout's)."""
    old = os.environ.get("PYTHONPATH")
    if src is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = str(src)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.requests or (60 if args.quick else 4000)
    rounds = args.rounds or (2 if args.quick else 10)
    conc = args.concurrency
    pinning = Pinning.plan()
    pinning.pin_self()
    tmp = Path(tempfile.mkdtemp(prefix="charter-compare-home-"))
    standin = None
    daemons: dict[str, Any] = {}
    doc: dict[str, Any] = {"benchmark": "gateway_compare", "quick": args.quick, "environment": environment(pinning)}
    with worktree(args.against) as (tree, sha):
        try:
            standin = start_standin(pinning, [MODEL], token_delay=0.0)
            v1 = standin.url + "/v1"
            price = (0.15, 0.60) if args.priced else (0.0, 0.0)
            targets = [Target("direct", v1 + "/chat/completions", None, MODEL)]
            for side, src in (("against", tree / "src"), ("this_checkout", None)):
                home = charter_home(tmp / side, backends={"sb": v1}, aliases={"bench": [f"sb/{MODEL}"]},
                                    prices={f"sb/{MODEL}": price}, roles_extra=ROLE_NO_BUDGET)
                progress(f"starting charter up ({side})")
                with python_path(src):
                    daemons[side] = start_charter(home, pinning)
                ch = daemons[side]
                if args.priced:
                    agent = await ch.enroll("benchpaid", "worker")
                    await ch.admin("PUT", "/v1/admin/budget",
                                   json={"scope": "agent:benchpaid", "unit": "usd", "period": "day", "limit": 1000})
                else:
                    agent = await ch.enroll("benchfree", "benchfree")
                targets.append(Target(side, ch.url + "/v1/chat/completions", agent.api_key, "bench", ch.pid))
                await agent.close()
            for t in targets:
                await closed_loop(t, n=max(n // 10, 20), concurrency=4, stream=args.stream)
            busy = Busy(lambda: [os.getpid(), standin.pid, *(d.pid for d in daemons.values())])
            calm = await wait_calm(busy, max_wait=0 if args.quick else 60)
            progress(f"{n} requests per target at c={conc} in {rounds} interleaved rounds")
            https = {t.name: session(conc) for t in targets}
            runs: dict[str, list[Any]] = {t.name: [] for t in targets}
            try:
                for rnd in range(rounds):
                    for t in (targets if rnd % 2 == 0 else targets[::-1]):
                        k = n // rounds + (1 if rnd < n % rounds else 0)
                        runs[t.name].append(await closed_loop(t, n=k, concurrency=conc, stream=args.stream,
                                                              http=https[t.name]))
            finally:
                for h in https.values():
                    await h.close()
            figs = {name: figure(rs, conc) for name, rs in runs.items()}
            sides = {}
            for side in ("against", "this_checkout"):
                fig = figs[side]
                sides[side] = {"added_ms": added(fig, figs["direct"]), "latency_ms": fig["latency_ms"],
                               "errors": fig["errors"], "gateway_cpu_ms_per_request": fig["gateway_cpu_ms_per_request"]}
            a, b = sides["against"], sides["this_checkout"]
            doc.update({
                "revision": {"rev": args.against, "commit": sha},  # what "against" ran
                "parameters": {"requests_per_target": n, "rounds": rounds, "concurrency": conc, "stream": args.stream,
                               "priced": args.priced, "stand_in_token_delay_s": 0.0},
                "machine_before": calm,
                "direct": figs["direct"]["latency_ms"],
                **sides,
                "ratio_this_over_against": {
                    **{f"added_{q}": r3(b["added_ms"][q] / a["added_ms"][q]) if a["added_ms"][q] > 0 else None
                       for q in ("p50", "p90", "p99")},
                    "cpu_per_request": r3(b["gateway_cpu_ms_per_request"] / a["gateway_cpu_ms_per_request"])
                    if a["gateway_cpu_ms_per_request"] else None,
                },
            })
        finally:
            for d in daemons.values():
                d.stop()
            if standin:
                standin.stop()
            rmtree_quiet(tmp)
    return doc


def main() -> None:
    doc = asyncio.run(run(parse_args()))
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

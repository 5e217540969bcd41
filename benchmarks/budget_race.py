"""The concurrent overspend race: 50 calls at once, each worth $0.01, against a $0.045 cap.

    .venv/bin/python benchmarks/budget_race.py            # the full run (Charter, then LiteLLM if it runs)
    .venv/bin/python benchmarks/budget_race.py --quick    # a smoke run: one round, no LiteLLM

Prints ONE JSON document on stdout; progress goes to stderr.

The model behind the gateway (a stand-in, OpenAI-compatible /v1, 2 ms per token so every call is
still in flight when the last one is sent) is priced at $0 input and $100 per million output tokens;
each request asks for `max_tokens` 100 and gets exactly 100 tokens back: $0.01 reserved, $0.01
spent. With a cap of $0.045 exactly four calls fit; the fifth would cross it.

Charter: an agent with the priced model, its budget set as the operator does it
(`PUT /v1/admin/budget {"scope": "agent:NAME", "unit": "usd", "period": "day", "limit": 0.045}`);
the 50 requests go out together on 50 connections with its bearer key. Afterwards the ledger is read
back (`GET /v1/admin/budget`): committed spend against the cap, what is still reserved (must be 0),
and the count of admitted (200) and refused (402) calls. Rounds alternate non-streaming and
streaming requests, each round with a fresh agent. Charter must never cross the cap.

LiteLLM (where it can run here): its per-key budgets (`/key/generate` with `max_budget`) need its
database (Prisma), which cannot fetch its engine binaries on these machines; the attempt and its
answer are reported. Its proxy-wide `max_budget` is then tried without a database, with the same
price and cap, and the same 50 requests: admitted count and the spend LiteLLM itself reports
(`x-litellm-response-cost`) are printed as measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from gwlib import (  # noqa: E402
    LITELLM_MASTER_KEY,
    StartError,
    Pinning,
    Target,
    charter_home,
    ensure_litellm,
    environment,
    litellm_config,
    litellm_model,
    progress,
    rmtree_quiet,
    start_charter,
    start_litellm,
    start_standin,
)

MODEL = "llama3.2:3b"
OUT_PER_MTOK = 100.0  # USD per million output tokens: 100 tokens = $0.01
TOKENS = 100
CAP_USD = 0.045
MICRO = 1_000_000
PROMPT = f"Write the report. [[tokens={TOKENS}]]"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round, no LiteLLM")
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--token-delay", type=float, default=0.002, help="stand-in seconds per token")
    p.add_argument("--no-litellm", action="store_true")
    return p.parse_args()


async def fire(t: Target, n: int, stream: bool) -> list[dict[str, Any]]:
    """`n` requests released together, each on its own connection."""
    body = t.body(stream, prompt=PROMPT, max_tokens=TOKENS)
    gate = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=n, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one() -> dict[str, Any]:
            await gate.wait()
            t0 = time.perf_counter()
            try:
                async with http.post(t.url, data=body, headers=t.headers()) as r:
                    data = await r.read()
                    out = {"status": r.status, "ms": round((time.perf_counter() - t0) * 1000, 2),
                           "cost": r.headers.get("x-litellm-response-cost")}
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                return {"status": 0, "error": repr(exc)}
            if r.status == 200:
                out["complete"] = data.rstrip().endswith(b"data: [DONE]") if stream else b'"choices"' in data
                if not stream:
                    out["completion_tokens"] = (orjson.loads(data).get("usage") or {}).get("completion_tokens")
            else:
                out["error"] = data[:300].decode(errors="replace")
            return out

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0.05)
        gate.set()
        return list(await asyncio.gather(*tasks))


def tally(answers: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for a in answers:
        by[str(a["status"])] = by.get(str(a["status"]), 0) + 1
    ok = [a for a in answers if a["status"] == 200]
    return {"admitted": len(ok), "by_status": by, "admitted_complete": sum(1 for a in ok if a.get("complete")),
            "first_refusal": next((a.get("error") for a in answers if a["status"] != 200), None)}


async def charter_race(pinning: Pinning, tmp: Path, args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    standin = start_standin(pinning, [MODEL], token_delay=args.token_delay)
    charter = None
    try:
        home = charter_home(tmp / "home", backends={"paid": standin.url + "/v1"}, aliases={"race": [f"paid/{MODEL}"]},
                            prices={f"paid/{MODEL}": (0.0, OUT_PER_MTOK)})
        charter = start_charter(home, pinning)
        url = charter.url + "/v1/chat/completions"
        results = []
        for rnd in range(rounds):
            stream = rnd % 2 == 1
            name = f"racer{rnd}"
            agent = await charter.enroll(name, "worker")
            await charter.admin("PUT", "/v1/admin/budget",
                                json={"scope": f"agent:{name}", "unit": "usd", "period": "day", "limit": CAP_USD})
            await agent.close()
            t = Target("charter", url, agent.api_key, "race", charter.pid)
            progress(f"charter round {rnd + 1}/{rounds}: {args.concurrent} concurrent {'streaming ' if stream else ''}"
                     f"requests at ${per_call_usd():g} each against ${CAP_USD:g}")
            answers = await fire(t, args.concurrent, stream)
            budget = await charter.admin("GET", "/v1/admin/budget")
            row = next(r for r in budget["budgets"] if r.get("name") == name and r["unit"] == "usd")
            history = await charter.admin("GET", f"/v1/admin/budget/history?by=agent&agent={name}")
            spend = sum(h["usd_micros"] or 0 for h in history["history"])
            result = {"round": rnd + 1, "stream": stream, **tally(answers),
                      "cap_usd": row["hard"] / MICRO, "committed_usd": row["committed"] / MICRO,
                      "reserved_after_usd": row["reserved"] / MICRO, "spend_table_usd": spend / MICRO,
                      "overruns": sum(h["overruns"] or 0 for h in history["history"])}
            result["committed_le_cap"] = row["committed"] <= row["hard"]
            result["crossed_cap"] = not result["committed_le_cap"]
            results.append(result)
        return {"rounds": results,
                "max_committed_usd": max(r["committed_usd"] for r in results),
                "admitted_per_round": [r["admitted"] for r in results],
                "never_crossed_cap": all(r["committed_le_cap"] for r in results),
                "all_reservations_closed": all(r["reserved_after_usd"] == 0 for r in results)}
    finally:
        if charter:
            charter.stop()
        standin.stop()


async def litellm_race(pinning: Pinning, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    install = ensure_litellm()
    out: dict[str, Any] = {"version": install.version}
    if not install.ok:
        return {**out, "ran": False, "reason": install.reason}
    standin = start_standin(pinning, [MODEL], token_delay=args.token_delay)
    proxy = None
    try:
        model = litellm_model("race", MODEL, standin.url + "/v1", input_cost_per_token=0.0,
                              output_cost_per_token=OUT_PER_MTOK / MICRO)
        config = litellm_config([model], settings={"max_budget": CAP_USD, "budget_duration": "1d"})
        try:
            proxy = start_litellm(install, config, tmp / "litellm", pinning, log_level="WARNING")
        except StartError as exc:
            return {**out, "ran": False, "reason": f"could not start: {exc}"}
        # 1. per-key budget: a virtual key with max_budget (what LiteLLM documents for this)
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.url + "/key/generate", json={"max_budget": CAP_USD, "models": ["race"]},
                                 headers={"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}) as r:
                key_answer = {"status": r.status, "body": (await r.text())[:400]}
        key = None
        if key_answer["status"] == 200:
            key = orjson.loads(key_answer["body"]).get("key")
        out["per_key_budget"] = {"attempt": "POST /key/generate {max_budget: %g}" % CAP_USD, "answer": key_answer,
                                 "ran": key is not None}
        log = proxy.log_tail(400_000)
        if "DB not connected" in log or "No module named 'prisma'" in log:
            out["per_key_budget"]["server_log"] = [
                line.strip() for line in log.splitlines()
                if "DB not connected" in line or "No module named 'prisma'" in line][:2]
        if key:
            answers = await fire(Target("litellm", proxy.url + "/v1/chat/completions", key, "race"), args.concurrent,
                                 False)
            out["per_key_budget"]["result"] = {**tally(answers), **spend_of(answers)}
        else:
            out["per_key_budget"]["why_not"] = (
                "virtual keys and their budgets live in LiteLLM's database (PostgreSQL through Prisma); Prisma cannot "
                "fetch its engine binaries on these machines (shared/reference/measured-here.md), so the proxy runs "
                "without DATABASE_URL and /key/generate fails with 'DB not connected' (server_log); the HTTP answer "
                "is a bare 500 because LiteLLM's error handler then fails to import prisma, which litellm[proxy] "
                "does not install")
        # 2. the proxy-wide max_budget, which is all that can be configured without a database
        progress(f"litellm: {args.concurrent} concurrent requests, proxy-wide max_budget ${CAP_USD:g}")
        answers = await fire(Target("litellm", proxy.url + "/v1/chat/completions", LITELLM_MASTER_KEY, "race"),
                             args.concurrent, False)
        warned = "will NOT be enforced" in proxy.log_tail(200_000)
        out["proxy_wide_budget"] = {"config": {"litellm_settings.max_budget": CAP_USD, "budget_duration": "1d"},
                                    **tally(answers), **spend_of(answers), "cap_usd": CAP_USD,
                                    "litellm_logged_budget_not_enforced_without_db": warned}
        out["proxy_wide_budget"]["crossed_cap"] = out["proxy_wide_budget"]["spend_usd"] > CAP_USD
        out["ran"] = True
        return out
    finally:
        if proxy:
            proxy.stop()
        standin.stop()


def spend_of(answers: list[dict[str, Any]]) -> dict[str, Any]:
    costs = [float(a["cost"]) for a in answers if a["status"] == 200 and a.get("cost") not in (None, "")]
    ok = sum(1 for a in answers if a["status"] == 200)
    return {"spend_usd": round(sum(costs), 6) if costs else round(ok * per_call_usd(), 6),
            "spend_source": "x-litellm-response-cost headers" if costs else "admitted x price (no cost header)"}


def per_call_usd() -> float:
    return TOKENS * OUT_PER_MTOK / MICRO


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (1 if args.quick else 4)
    pinning = Pinning.plan()
    pinning.pin_self()
    per = per_call_usd()
    doc: dict[str, Any] = {"benchmark": "budget_race", "quick": args.quick, "environment": environment(pinning),
                           "setup": {"concurrent_requests": args.concurrent, "per_call_usd": per, "cap_usd": CAP_USD,
                                     "calls_that_fit": math.floor(CAP_USD / per + 1e-9),
                                     "price": {"input_per_mtok": 0.0, "output_per_mtok": OUT_PER_MTOK},
                                     "max_tokens": TOKENS, "stand_in_token_delay_s": args.token_delay}}
    tmp = Path(tempfile.mkdtemp(prefix="charter-race-"))
    try:
        doc["charter"] = await charter_race(pinning, tmp, args, rounds)
        if args.quick or args.no_litellm:
            doc["litellm"] = {"ran": False, "reason": "skipped: --quick" if args.quick else "skipped: --no-litellm"}
        else:
            doc["litellm"] = await litellm_race(pinning, tmp, args)
        c = doc["charter"]
        doc["summary"] = {"charter_committed_usd_max": c["max_committed_usd"], "cap_usd": CAP_USD,
                          "charter_admitted_per_round": c["admitted_per_round"],
                          "charter_never_crossed_cap": c["never_crossed_cap"]}
        lite = doc["litellm"]
        if lite.get("ran"):
            doc["summary"]["litellm_proxy_wide_admitted"] = lite["proxy_wide_budget"]["admitted"]
            doc["summary"]["litellm_proxy_wide_spend_usd"] = lite["proxy_wide_budget"]["spend_usd"]
            doc["summary"]["litellm_per_key_budget_ran"] = lite["per_key_budget"]["ran"]
    finally:
        rmtree_quiet(tmp)
    return doc


def main() -> None:
    doc = asyncio.run(run(parse_args()))
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

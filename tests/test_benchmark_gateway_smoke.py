"""The gateway benchmarks (`benchmarks/gateway.py`, `failover.py`, `budget_race.py`) run with --quick.

Each prints one JSON document. No timing is asserted (machines differ, and these ones are shared):
only that every figure is a number and each verdict a boolean. One correctness check is asserted:
in the budget race, Charter's committed spend never crosses the cap and every reservation closes.
The three run side by side to keep this under ~40 s; --quick skips LiteLLM.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("gateway", "failover", "budget_race")


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def docs() -> dict[str, Any]:
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for name in SCRIPTS}
    out: dict[str, Any] = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=100)
            assert p.returncode == 0, f"{name}.py --quick failed:\n{stderr[-3000:]}"
            out[name] = json.loads(stdout)  # exactly one JSON document on stdout
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_gateway_benchmark_prints_numbers(docs: dict[str, Any]) -> None:
    doc = docs["gateway"]
    assert doc["quick"] is True
    assert doc["litellm"]["ran"] is False and doc["litellm"]["reason"]
    for mode in ("non_stream", "stream"):
        for conc in ("c1", "c16"):
            figs = doc["results"][mode][conc]
            assert set(figs) == {"direct", "charter", "charter_priced", "floor"}
            for name, fig in figs.items():
                for q in ("p50", "p90", "p99", "max", "mean"):
                    assert number(fig["latency_ms"][q]), (mode, conc, name, q)
                assert number(fig["throughput_rps"]) and fig["throughput_rps"] > 0
                assert fig["errors"] == 0, fig.get("first_error")
                if name != "direct":
                    assert all(number(v) for v in fig["added_ms"].values())
                    assert number(fig["gateway_cpu_ms_per_request"])
    for key, verdicts in doc["targets"].items():
        if key == "all_met":
            assert isinstance(verdicts, bool)
            continue
        for name, v in verdicts.items():
            if "litellm" in name:
                assert v["meets_target"] is None
            else:
                assert number(v["value"]) and isinstance(v["meets_target"], bool), (key, name)
    for key, row in doc["floor"].items():  # Charter's added latency split at the floor proxy's
        if key == "means":
            continue
        mode, conc = key.split(".")
        figs = doc["results"][mode][conc]
        for variant in ("charter", "charter_priced"):
            for q, beyond in row[f"{variant}_beyond_floor_ms"].items():
                assert beyond == pytest.approx(figs[variant]["added_ms"][q] - figs["floor"]["added_ms"][q], abs=2e-3)
    answers = doc["checks"]["answers"]  # the floor proxy joined the streamed pieces into the same answer
    assert answers["floor"]["non_stream"]["answer"] == answers["direct"]["non_stream"]["answer"] != ""
    assert doc["checks"]["bus_events_per_call"] == 1  # each call has its event on the bus
    assert doc["checks"]["priced_agent_usd_committed_micros"] > 0  # and the priced calls were settled
    assert doc["checks"]["priced_agent_usd_reserved_micros"] == 0


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_failover_benchmark_prints_numbers(docs: dict[str, Any]) -> None:
    doc = docs["failover"]
    assert doc["quick"] is True and doc["litellm"]["ran"] is False
    c = doc["charter"]
    kill = c["kill"]
    assert number(kill["kill_to_first_backup_answer_ms"]) and kill["kill_to_first_backup_answer_ms"] > 0
    assert number(kill["client_visible_failures_after_kill"])
    assert kill["sent_after_kill_answered_by_primary"] == 0  # a dead process answers nothing
    for phase in ("before_kill", "circuit_open"):
        for q in ("p50", "p90", "p99"):
            assert number(c[phase]["added_ms"][q]), (phase, q)
    assert c["circuit_open"]["through_failover_alias"]["not_answered_by_backup"] == 0
    assert isinstance(c["target"]["meets_target"], bool)
    assert c["primary_circuit_at_end"]["state"] in ("open", "half_open")


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_budget_race_never_crosses_the_cap(docs: dict[str, Any]) -> None:
    doc = docs["budget_race"]
    assert doc["quick"] is True and doc["litellm"]["ran"] is False
    fits = doc["setup"]["calls_that_fit"]
    assert fits == 4
    for r in doc["charter"]["rounds"]:
        assert number(r["committed_usd"]) and number(r["cap_usd"])
        assert r["committed_usd"] <= r["cap_usd"], r  # the correctness check: never over the cap
        assert r["reserved_after_usd"] == 0, r  # every reservation settled or released
        assert 1 <= r["admitted"] <= fits, r
        assert r["by_status"].get("402", 0) == doc["setup"]["concurrent_requests"] - r["admitted"], r
        assert math.isclose(r["committed_usd"], r["spend_table_usd"]), r
    assert doc["charter"]["never_crossed_cap"] is True

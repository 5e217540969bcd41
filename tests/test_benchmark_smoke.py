"""`benchmarks/bus.py --quick` runs and prints one JSON document whose every figure is a number.

No timing is asserted (machines differ, and these ones are shared): only the shape of the document,
that every figure has a numeric value and a ratio, and that each `meets_target` agrees with its value.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("a_verify_only", "b_publish_in_process", "c_publish_http_batch", "d_publish_http_single_latency")


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_bus_benchmark_prints_every_figure() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bus.py"), "--quick"],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert doc["quick"] is True

    figures = doc["figures"]
    assert tuple(figures) == FIGURES
    for name, fig in figures.items():
        assert number(fig["value"]) and fig["value"] > 0, (name, fig["value"])
        assert number(fig["ratio"]) and fig["ratio"] > 0, (name, fig["ratio"])
        assert isinstance(fig["ratio_means"], str) and fig["ratio_means"]
    for name in FIGURES[1:]:  # every figure but the reference has a baseline, a target and a verdict
        fig = figures[name]
        assert number(fig["baseline"]["value"]) and fig["baseline"]["value"] > 0, name
        assert fig["target"], name
        assert isinstance(fig["meets_target"], bool), name
    assert figures["a_verify_only"]["target"] is None and figures["a_verify_only"]["meets_target"] is None

    b, c, d = figures["b_publish_in_process"], figures["c_publish_http_batch"], figures["d_publish_http_single_latency"]
    assert b["baseline"]["value"] == figures["a_verify_only"]["value"]
    assert b["meets_target"] == (b["ratio"] >= 0.8)
    assert number(b["from_bytes"]["value"]) and number(b["from_bytes"]["ratio_to_a"])
    assert c["meets_target"] == (c["value"] >= 5000)
    assert number(c["baseline"]["health_round_trips_per_s"]) and number(c["ratio_to_b"])
    for run in (d["detail"], d["baseline_detail"]):
        assert run["errors"] == 0 and run["requests"] > 0
        assert 0 <= run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert d["value"] == d["p99_ms"] == d["detail"]["p99_ms"]
    assert d["meets_target"] == (d["p99_ms"] <= 5.0)

    assert doc["targets_met"] == {name: figures[name]["meets_target"] for name in FIGURES[1:]}
    assert doc["all_targets_met"] == all(doc["targets_met"].values())
    assert isinstance(doc["affinity"]["pinned"], bool)
    for phase in ("a_b", "c", "d"):
        assert number(doc["cpu_during"][phase]["foreign_cores"])

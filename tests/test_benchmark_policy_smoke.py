"""`benchmarks/policy.py --quick` runs and prints one JSON document whose every figure is a number.

No timing is asserted: machines differ. Only the shape, and that every engine gave the same answers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("p50_us", "p90_us", "p99_us", "max_us", "mean_us")


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_section(name: str, section: dict, decisions: int) -> None:
    for n in ("1", "100", "100_wildcard"):
        row = section[n]
        for figure in FIGURES:
            assert number(row[figure]) and row[figure] >= 0, (name, n, figure, row[figure])
        assert row["p50_us"] <= row["p90_us"] <= row["p99_us"] <= row["max_us"], (name, n, row)
        assert row["decisions"] == decisions
        assert sum(p["decisions"] for p in row["by_path"].values()) == decisions
        for path in row["by_path"].values():
            assert number(path["p50_us"]) and number(path["p99_us"])


def test_quick_policy_benchmark_prints_numbers() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "policy.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert doc["quick"] is True
    decisions = doc["workload"]["decisions_per_rule_count"]
    assert decisions == 2000 and doc["workload"]["rule_counts"] == [1, 100]
    assert number(doc["workload"]["timer_overhead_ns_p50"])

    check_section("charter", doc["charter"], decisions)
    assert doc["charter"]["100"]["by_path"].keys() == {"rule_with_condition", "rule_without_condition", "unknown_action"}
    assert 0 < doc["charter"]["100"]["allowed"] < decisions

    # --quick never installs the toolkit: the comparison is the plain-Python baseline, and it says so.
    comparison = doc["comparison"]
    assert comparison["engine"] == "plain-python" and "--quick" in comparison["note"]
    check_section("comparison", comparison, decisions)
    check_section("plain_python_baseline", doc["plain_python_baseline"], decisions)
    # The wildcard workload: every rule is a candidate for the one action, matched at every depth.
    assert doc["charter"]["100_wildcard"]["by_path"].keys() == {
        "matched_in_first_half", "matched_in_second_half", "no_rule_matches"}
    assert doc["meets_target_wildcard"] == (doc["charter"]["100_wildcard"]["p50_us"] <= 10.0)
    for n in ("1", "100", "100_wildcard"):
        assert comparison[n]["agree"] is True and comparison[n]["disagreements"] == 0
        assert number(doc["p50_ratio_comparison_over_charter"][n])

    assert isinstance(doc["meets_target"], bool)
    assert doc["meets_target"] == (doc["charter"]["100"]["p50_us"] <= 10.0)

"""`benchmarks/budget.py --quick` runs and prints one JSON document whose every figure is a number.

No timing is asserted: machines differ. Only the shape, and that the ledger stayed exact.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("multi_process", "single_process_baseline", "busy_timeout_variant")
FIGURES = ("pairs_per_s", "p50_ms", "p99_ms", "p999_ms", "max_ms", "slowest_process_pairs_per_s",
           "fastest_process_pairs_per_s", "fairness", "cpu_ms_per_pair", "pairs")


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_budget_benchmark_prints_numbers(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "budget.py"), "--quick", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert doc["quick"] is True and doc["procs"] == 4
    for name in SCENARIOS:
        section = doc[name]
        for figure in FIGURES:
            assert number(section[figure]), (name, figure, section[figure])
        assert section["pairs"] > 0 and section["pairs_per_s"] > 0
        assert 0 < section["fairness"] <= 1
        assert section["p50_ms"] <= section["p99_ms"] <= section["p999_ms"] <= section["max_ms"]
        assert section["per_round_pairs_per_s"] and all(number(x) for x in section["per_round_pairs_per_s"])
        assert section["exact"] is True
        other = section["other_processes_cpu_share"]  # from /proc/stat: Linux only
        assert number(other) if sys.platform == "linux" else other is None or number(other)
    for figure in ("multi_vs_single", "flock_vs_busy_timeout", "target_pairs_per_s", "elapsed_s"):
        assert number(doc[figure]), (figure, doc[figure])
    assert isinstance(doc["meets_target"], bool)
    assert doc["exact"] is True
    assert list(tmp_path.iterdir()) == []  # the temporary databases are gone

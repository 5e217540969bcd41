"""`benchmarks/supervisor.py --quick` runs and prints one JSON document whose figures are numbers.

No timing is asserted (machines differ): only the shape, and that every service passed in every mode.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def test_quick_supervisor_benchmark_prints_numbers() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "supervisor.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["quick"] is True and doc["services"] == 150 and doc["meets_target"] is None
    assert doc["mix"] == {"tcp": 50, "http": 50, "process": 50}
    assert set(doc["scenarios"]) == {"health_10ms", "instant"}
    for s in doc["scenarios"].values():
        assert s["all_passing"] and s["concurrent"]["states"] == {"passing": 150}
        assert s["concurrent"]["events_signed"] == 150 and s["concurrent"]["failures"] == []
        for figure in ("first_cycle_s", "steady_median_s", "steady_max_s"):
            assert number(s["concurrent"][figure])
        assert number(s["sequential"]["cycle_s"]) and number(s["speedup_first_cycle"])
    assert number(doc["memory"]["rss_mb"]) and number(doc["memory"]["peak_rss_mb"])
    assert doc["all_passing"] is True

"""`benchmarks/mcp_proxy.py --quick` runs and prints one JSON document whose figures are numbers.

No timing is asserted (machines differ): only the shape, and that both paths made every call.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_mcp_proxy_benchmark_prints_numbers() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mcp_proxy.py"), "--quick"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert doc["benchmark"] == "mcp_proxy" and doc["quick"] is True
    calls = doc["workload"]["calls_per_path"]
    assert calls > 0
    for path in ("direct_ms", "proxied_ms", "decision_ms"):
        row = doc[path]
        assert row["calls"] == calls
        assert all(number(row[f]) and row[f] > 0 for f in FIGURES), row
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"], row
    for f in ("p50_ms", "p90_ms", "p99_ms"):
        assert doc["added_ms"][f] == round(doc["proxied_ms"][f] - doc["direct_ms"][f], 3)
    assert doc["target_added_p50_ms"] == 1.0
    assert doc["meets_target"] == (doc["added_ms"]["p50_ms"] <= 1.0)
    assert number(doc["cpu_ms_per_call"]["proxy_process_per_proxied_call"])

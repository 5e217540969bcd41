"""`benchmarks/archive.py --quick` runs and prints one JSON document whose every figure is a number.

No timing is asserted: machines differ. Only the shape, and that the archive it built verified.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_archive_benchmark_prints_numbers() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "archive.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert doc["quick"] is True and doc["workload"]["events"] == 20_000
    for section, figures in {"seal": ("events_per_s", "seconds", "compression_ratio"),
                             "verify": ("events_per_s", "seconds"),
                             "verify_with_live": ("events_per_s", "entries_checked_per_s", "seconds"),
                             "sha256": ("per_entry_events_per_s", "bulk_mb_per_s"),
                             "ratios": ("seal_over_sha256", "verify_over_sha256")}.items():
        for figure in figures:
            assert number(doc[section][figure]), (section, figure, doc[section])
    # The production archivist sealed the whole log: the workload and its own identity event.
    sealed = doc["seal"]["sealed_events"]
    assert 20_000 < sealed < 20_010 and doc["seal"]["segments"] == math.ceil(sealed / 10_000)
    assert doc["targets"] == {"seal_events_per_s": 20_000, "verify_events_per_s": 50_000}
    assert doc["meets_targets"]["seal"] == (doc["seal"]["events_per_s"] >= 20_000)
    assert doc["meets_targets"]["verify"] == (doc["verify"]["events_per_s"] >= 50_000)

"""`benchmarks/bus.py --backend nats --quick` runs and prints one JSON document of numeric figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .support import require_nats_server_binary

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.slow
def test_quick_nats_bus_benchmark(shared_nats: str) -> None:
    require_nats_server_binary()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bus.py"), "--backend", "nats", "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["quick"] is True and doc["log"]["verified"] is True
    assert doc["log"]["jetstream_messages"] < doc["log"]["entries"]  # batches and group commits share messages
    assert set(doc["figures"]) == {"batch", "single", "ingest"}
    for name, fig in doc["figures"].items():
        for x in (fig["value"], fig["baseline"]["value"], fig["ratio"]):
            assert isinstance(x, float) and math.isfinite(x) and x > 0, (name, fig)

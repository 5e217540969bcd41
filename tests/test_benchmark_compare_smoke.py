"""`benchmarks/gateway_compare.py --quick`: two daemons (this checkout and HEAD, from a temporary git
worktree) against one stand-in, in interleaved rounds. No timing is asserted; the document must
name the commit compared with, give both sides' figures as numbers, and leave no worktree behind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_compare_runs_both_sides_and_cleans_up() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: there is no other revision to compare with")
    before = git("worktree", "list", "--porcelain")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gateway_compare.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["benchmark"] == "gateway_compare" and doc["quick"] is True
    assert doc["revision"] == {"rev": "HEAD", "commit": git("rev-parse", "HEAD")}
    for side in ("against", "this_checkout"):
        assert doc[side]["errors"] == 0
        assert all(number(doc[side]["added_ms"][q]) for q in ("p50", "p90", "p99"))
        assert number(doc[side]["gateway_cpu_ms_per_request"]) and doc[side]["gateway_cpu_ms_per_request"] > 0
    assert set(doc["ratio_this_over_against"]) == {"added_p50", "added_p90", "added_p99", "cpu_per_request"}
    assert git("worktree", "list", "--porcelain") == before  # the temporary worktree is gone

    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gateway_compare.py"), "--quick",
                          "--against", "no-such-rev"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode != 0 and "'no-such-rev' is not a revision" in bad.stderr

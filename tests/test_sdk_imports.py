"""An agent that imports the SDK gets the SDK, not the daemon.

`charter.sdk` once imported `charter.node` for three small proof messages, and with it the policy
engine (and `cel`, which loads prompt_toolkit for its own CLI), governance and the config models:
~0.9 s before an agent could do anything. Each check runs in a fresh interpreter, since this test
process has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

DAEMON_ONLY = ("charter.node", "charter.governance", "charter.policy.engine", "cel", "uvicorn", "fastapi")


@pytest.mark.parametrize(("module", "absent"), [
    ("charter.sdk", DAEMON_ONLY),
    ("charter.cli.operator", ("charter.node", "uvicorn")),  # how every CLI command finds the daemon
])
def test_importing_it_loads_none_of_the_daemon(module: str, absent: tuple[str, ...]) -> None:
    probe = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"importing {module} loaded {done.stdout.strip()}"

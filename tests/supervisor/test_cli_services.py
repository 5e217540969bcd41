"""`charter services ...` against a real daemon (`charter up`) supervising a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.config import Home
from charter.server.daemon import stop
from tests.conftest import Daemon, free_port, make_home, start_daemon
from tests.supervisor.conftest import PY, SVC, toml_list

pytestmark = pytest.mark.slow


def charter(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHARTER_HOME": str(home.root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env, timeout=60)


def jcharter(home: Home, *args: str) -> object:
    done = charter(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def daemon_with_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("cli")
    home = make_home(root / "home")
    port = free_port()
    status = root / "status"
    status.write_text("200")
    home.config_path.write_text(home.config_path.read_text() + f"""
[[services]]
label = "ai.test.web"
name = "web"
why = "serves the pages"
tier = "critical"
command = {toml_list([PY, SVC, "--port", str(port), "--status-file", str(status)])}
port = {port}
interval = "1h"
restart = {{ base = "0.1s", start_period = "10s" }}
check = {{ kind = "http", url = "http://127.0.0.1:{{port}}/" }}

[[services]]
label = "ai.test.nothing"
interval = "1h"
check = {{ kind = "tcp", port = {free_port()} }}
""")
    d = start_daemon(home)
    yield d, status
    stop(home)


def test_list_check_restart_history(daemon_with_services: tuple[Daemon, Path]) -> None:
    d, status = daemon_with_services
    home = d.home
    import time

    deadline = time.monotonic() + 15
    while True:
        rows = {r["label"]: r for r in jcharter(home, "services", "list")}
        if rows["ai.test.web"]["state"] == "passing" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    web = rows["ai.test.web"]
    assert web["state"] == "passing" and web["manager"] == "charter" and web["why"] == "serves the pages"
    assert rows["ai.test.nothing"]["state"] == "critical" and rows["ai.test.nothing"]["manager"] == "none"
    text = charter(home, "services", "list")
    assert text.returncode == 0 and "ai.test.web" in text.stdout and "passing" in text.stdout

    ok = charter(home, "services", "check", "ai.test.web")
    assert ok.returncode == 0 and "ok" in ok.stdout and "HTTP 200" in ok.stdout
    status.write_text("500")
    bad = charter(home, "services", "check", "ai.test.web", "--json")
    assert bad.returncode == 1
    result = json.loads(bad.stdout)
    assert result["result"]["detail"].startswith("HTTP 500")
    status.write_text("200")

    pid = {r["label"]: r for r in jcharter(home, "services", "list")}["ai.test.web"]["managed"]["pid"]
    restarted = jcharter(home, "services", "restart", "ai.test.web")
    assert restarted["restarted"] and restarted["via"] == "charter" and restarted["managed"]["pid"] != pid
    refused = charter(home, "services", "restart", "ai.test.nothing")
    assert refused.returncode == 4 and "no manager" in refused.stderr
    reset = jcharter(home, "services", "reset", "ai.test.nothing")  # reset-failed: checked again, not restarted
    assert reset["state"] == "critical" and reset["restart_policy"]["in_window"] == 0 and reset["run_id"]
    missing = charter(home, "services", "check", "ai.nope")
    assert missing.returncode == 4 and "not_found" in missing.stderr

    h = jcharter(home, "services", "history", "ai.test.web", "--checks")
    kinds = {r["kind"] for r in h["history"]}
    assert {"state", "check", "restart"} <= kinds and set(h["uptime"]) == {"1h", "24h", "7d", "30d"}
    text = charter(home, "services", "history", "ai.test.web")
    assert text.returncode == 0 and "uptime" in text.stdout and "restart" in text.stdout

    stopped = jcharter(home, "services", "stop", "ai.test.web")
    assert stopped["state"] == "stopped" and stopped["managed"]["pid"] is None
    started = jcharter(home, "services", "start", "ai.test.web")
    assert started["state"] == "starting" and started["managed"]["pid"]
    reloaded = jcharter(home, "services", "reload")
    assert reloaded == {"added": [], "removed": [], "changed": []}

    events = charter(home, "tail", "charter.services.>", "-n", "50", "--json")
    subjects = {json.loads(line)["envelope"]["subject"] for line in events.stdout.splitlines()}
    assert {"charter.services.health", "charter.services.restarts", "charter.services.alerts"} <= subjects

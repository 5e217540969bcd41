"""The gateway's backends are services too: a stand-in Ollama that Charter runs, checked by a deep
generation probe, is restarted when it is killed -9 or when it answers empty, and the gateway's
circuit for it closes again so traffic returns. A real daemon process, a real stand-in process.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from charter.server.daemon import stop
from tests.conftest import Daemon, free_port, make_home, start_daemon
from tests.supervisor.conftest import PY, kill_leftovers, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
LABEL = "ai.ollama.primary"

MODELS = """[models]
default_max_tokens = 64

[models.backends.primary]
kind = "ollama"
url = "http://127.0.0.1:{port}"
managed_service = "{label}"

[models.aliases]
default = ["primary/llama3.2:3b", "degraded"]

[models.timeouts]
connect = "1s"
first_token = "2s"
cold_first_token = "4s"
idle = "1s"
total = "10s"

[models.breaker]
failures = 1                # any failure opens it: the outage is visible on the circuit, whatever its shape
cooldown = "1s"
max_cooldown = "4s"

[models.probe]
interval = "1h"
timeout = "2s"

"""

SERVICE = """
[[services]]
label = "{label}"
name = "ollama (stand-in)"
tier = "critical"
why = "the local model every alias starts with"
command = {command}
interval = "1s"
retry_interval = "0.2s"
timeout = "4s"
port = {port}
restart = {{ base = "0.2s", cap = "2s", start_period = "15s" }}
[services.check]
kind = "model"
backend = "primary"
"""


@pytest.fixture
def model_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    home = make_home(tmp_path / "home")
    text = home.config_path.read_text()
    start, end = text.index("# The model gateway."), text.index("# Roles: what an enrolled agent may do.")
    command = json.dumps([PY, "-m", "charter.models.standin", "--port", str(port), "--models", "llama3.2:3b"])
    text = text[:start] + MODELS.format(port=port, label=LABEL) + text[end:]
    home.config_path.write_text(text + SERVICE.format(label=LABEL, command=command, port=port))
    d = start_daemon(home)
    try:
        yield d, port
    finally:
        stop(home)
        kill_leftovers(f"--port {port} --models llama3.2:3b")


async def service(d: Daemon) -> dict[str, Any]:
    return await d.admin("GET", f"/v1/admin/services/{LABEL}")


async def circuit(d: Daemon) -> str:
    data = await d.admin("GET", "/v1/admin/models")
    return next(b["state"] for b in data["backends"] if b["backend"] == "primary")


async def chat(d: Daemon, key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(
            d.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": "default", "messages": [{"role": "user", "content": "hello there"}]}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["charter"]


async def bus(d: Daemon, pattern: str) -> list[dict[str, Any]]:
    evs = (await d.admin("GET", "/v1/events", params={"pattern": pattern, "limit": 1000}))["events"]
    return [{"seq": e["seq"], "subject": e["envelope"]["subject"], **e["envelope"]["payload"]} for e in evs]


async def test_model_check_restarts_a_killed_or_lying_standin_and_the_circuit_closes_again(model_daemon) -> None:
    d, port = model_daemon
    agent = await d.enroll("alpha")
    try:
        async def state_is(want: str) -> bool:
            return (await service(d))["state"] == want

        await wait_until(lambda: state_is("passing"), timeout=20, every=0.1)
        assert (await chat(d, agent.api_key))["backend"] == "primary/llama3.2:3b"
        first_pid = (await service(d))["managed"]["pid"]

        # 1. kill -9: live traffic finds the port dead (the circuit opens, the answer degrades); the
        #    supervisor restarts the stand-in, probes it, and the circuit closes again.
        before = max(e["seq"] for e in await bus(d, ">"))
        os.kill(first_pid, signal.SIGKILL)
        assert (await chat(d, agent.api_key))["backend"] == "degraded"

        async def back(old_pid: int) -> bool:
            s = await service(d)
            return s["state"] == "passing" and s["managed"]["pid"] not in (None, old_pid)

        await wait_until(lambda: back(first_pid), timeout=20, every=0.1)
        await wait_until(lambda: _closed(d), timeout=10, every=0.1)
        assert (await chat(d, agent.api_key))["backend"] == "primary/llama3.2:3b"
        states = [e["state"] for e in await bus(d, "charter.services.health")]
        assert states[-3:] == ["critical", "starting", "passing"]
        (restart,) = await bus(d, "charter.services.restarts")
        assert restart["service"] == LABEL and restart["via"] == "charter" and restart["ok"]
        after = [e for e in await bus(d, ">") if e["seq"] > before]
        circuits = [e["state"] for e in after if e["subject"] == "charter.models.health" and e["backend"] == "primary"]
        assert circuits and circuits[0] == "open" and circuits[-1] == "closed", after  # the outage, and the recovery

        # 2. The process lives, its port answers, but generation comes back empty (the GPU-reset lie):
        #    only the deep probe sees it, and the supervisor restarts the service through its manager.
        second_pid = (await service(d))["managed"]["pid"]
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/__standin/fault",
                                                        json={"mode": "empty"}) as r:
            assert r.status == 200
        await wait_until(lambda: back(second_pid), timeout=20, every=0.1)
        restarts = await bus(d, "charter.services.restarts")
        assert len(restarts) == 2
        lying = [e for e in await bus(d, "charter.services.health") if e["state"] == "critical"][-1]
        assert "probe failed" in lying["reason"] and "empty" in lying["reason"]
        await wait_until(lambda: _closed(d), timeout=10, every=0.1)
        assert (await chat(d, agent.api_key))["backend"] == "primary/llama3.2:3b"

        listing = await d.admin("GET", "/v1/admin/services")
        (svc,) = listing["services"]
        assert svc["check"] == "model" and svc["restarts"] == 2 and svc["tier"] == "critical"
    finally:
        await agent.close()


async def _closed(d: Daemon) -> bool:
    return await circuit(d) == "closed"

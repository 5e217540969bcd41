"""The budget and approvals API through the real daemon: every reserve is a published decision, and
every mistake in `charter budget set` / `charter approvals list` names the key and the value."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from charter.errors import CharterError
from conftest import Daemon


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    return shared_daemon


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHARTER_HOME": str(d.home.root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                          timeout=60)


async def decisions(d: Daemon, name: str) -> list[dict[str, Any]]:
    answer = await d.admin("GET", "/v1/events", params={"pattern": f"charter.decisions.{name}", "limit": 500})
    return [e["envelope"]["payload"] for e in answer["events"]]


@pytest.mark.anyio
async def test_every_reserve_publishes_one_decision(daemon: Daemon) -> None:
    async with await daemon.enroll("decider") as agent:
        ok = await agent.reserve(model="openai/gpt-4o-mini", input_tokens=100, max_output_tokens=100)
        with pytest.raises(CharterError):  # the role's $1/day
            await agent.reserve(usd=1.5)
        with pytest.raises(CharterError):  # no rule: unknown actions are denied
            await agent.reserve(action="teleport.now", usd=0.01)
        got = [d for d in await decisions(daemon, agent.name) if "usd_micros" in d]
        assert [(d["action"], d["effect"], d["rule"], d.get("code")) for d in got] == [
            ("model.call", "allow", "paid-models", None),
            ("model.call", "deny", "paid-models", "budget_exceeded"),
            ("teleport.now", "deny", None, "policy_denied"),
        ]
        assert got[0]["reservation_id"] == ok["reservation_id"] and got[0]["tier"] == "T2"
        assert "left of $1" in got[1]["reason"]


def test_budget_set_remove_needs_no_limit(daemon: Daemon) -> None:
    assert cli(daemon, "budget", "set", "--scope", "role:worker", "--unit", "tokens", "--period", "hour",
               "--limit", "5000").returncode == 0
    removed = cli(daemon, "budget", "set", "--scope", "role:worker", "--unit", "tokens", "--period", "hour", "--remove")
    assert removed.returncode == 0, removed.stderr
    assert "removed: role:worker hour tokens limit" in removed.stdout
    missing = cli(daemon, "budget", "set", "--scope", "role:worker")
    assert missing.returncode == 2 and "--limit is required" in missing.stderr


@pytest.mark.parametrize(("args", "named"), [
    (["--scope", "role:wrker", "--limit", "1"], "unknown role 'wrker' in scope 'role:wrker'"),
    (["--scope", "agent:nobody", "--limit", "1"], "unknown agent 'nobody' in scope 'agent:nobody'"),
    (["--scope", "team:x", "--limit", "1"], "scope 'team:x' is not global, role:NAME or agent:NAME"),
    (["--scope", "global", "--limit", "1", "--unit", "dollars"], "unknown unit 'dollars'"),
    (["--scope", "global", "--limit", "1", "--period", "week"], "unknown period 'week'"),
    (["--scope", "global", "--limit", "1", "--soft", "2"], "soft_ratio must be in (0, 1], got 2"),
])
def test_budget_set_names_what_is_wrong(daemon: Daemon, args: list[str], named: str) -> None:
    proc = cli(daemon, "budget", "set", *args)
    assert proc.returncode != 0 and named in " ".join(proc.stderr.split()), proc.stderr
    shown = cli(daemon, "budget", "show", "--json")
    assert "wrker" not in shown.stdout and "dollars" not in shown.stdout


@pytest.mark.anyio
async def test_approvals_list_refuses_an_unknown_state(daemon: Daemon) -> None:
    proc = cli(daemon, "approvals", "list", "--state", "bogus")
    assert proc.returncode == 2 and "unknown --state 'bogus'" in proc.stderr
    with pytest.raises(CharterError) as exc:  # the operator API too (the dashboard uses it)
        await daemon.admin("GET", "/v1/admin/approvals", params={"state": "bogus"})
    assert exc.value.code == "bad_request" and "'bogus'" in exc.value.message
    assert cli(daemon, "approvals", "list", "--state", "denied").returncode == 0

"""The `charter` command as a user runs it: a real subprocess, real exit codes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charter.config import Home, parse_config
from charter.errors import ConfigError
from tests.conftest import make_home

CMDS = [
    [], ["init"], ["up"], ["down"], ["status"], ["invite"], ["invites"], ["invites", "list"],
    ["invites", "revoke"], ["enroll"], ["agents"], ["agents", "list"], ["agents", "show"],
    ["agents", "suspend"], ["agents", "resume"], ["agents", "revoke"], ["agents", "renew"],
    ["agents", "rotate-key"], ["publish"], ["tail"], ["log"], ["log", "verify"],
]


def charter(home: Path | Home, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    root = home.root if isinstance(home, Home) else home
    env = {**os.environ, "CHARTER_HOME": str(root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=60)


@pytest.mark.parametrize("cmd", CMDS, ids=lambda c: " ".join(c) or "charter")
def test_help_everywhere(tmp_path: Path, cmd: list[str]) -> None:
    proc = charter(tmp_path, *cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_init_is_idempotent_and_never_overwrites_the_key(tmp_path: Path) -> None:
    root = tmp_path / "h"
    first = charter(root, "init", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert "keys/root.key" in report["created"]
    key_before = (root / "keys" / "root.key").read_bytes()
    config_before = (root / "charter.toml").read_bytes()
    second = json.loads(charter(root, "init", "--json").stdout)
    assert second["created"] == []
    assert second["root_key_id"] == report["root_key_id"]
    assert (root / "keys" / "root.key").read_bytes() == key_before
    assert (root / "charter.toml").read_bytes() == config_before
    for path, mode in [(root, 0o700), (root / "keys", 0o700), (root / "keys" / "root.key", 0o600),
                       (root / "charter.toml", 0o600), (root / "charter.db", 0o600)]:
        assert path.stat().st_mode & 0o777 == mode, path


def test_home_flag_and_environment(tmp_path: Path) -> None:
    env_home, flag_home = tmp_path / "env", tmp_path / "flag"
    proc = charter(env_home, "--home", str(flag_home), "init")
    assert proc.returncode == 0
    assert (flag_home / "charter.toml").exists() and not env_home.exists()


def test_no_daemon_exits_3_with_a_clear_message(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    proc = charter(home, "status")
    assert proc.returncode == 3
    assert "cannot reach the Charter daemon" in proc.stderr


def test_uninitialised_home_exits_3(tmp_path: Path) -> None:
    proc = charter(tmp_path / "nothing", "agents", "list")
    assert proc.returncode == 3
    assert "charter init" in proc.stderr


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"bus": {"max_batch": "many"}}, "charter.toml")
    assert exc.value.where == "charter.toml: bus.max_batch"
    with pytest.raises(ConfigError) as exc:
        parse_config({"roles": {"w": {"publish": ["a.>.b"]}}}, "charter.toml")
    assert exc.value.where == "charter.toml: roles.w.publish"
    assert "'>' must be the last token" in exc.value.message
    with pytest.raises(ConfigError) as exc:
        parse_config({"daemon": {"prot": 1}}, "charter.toml")
    assert exc.value.where == "charter.toml: daemon.prot"
    with pytest.raises(ConfigError) as exc:
        parse_config({"identity": {"charter_ttl": "soon"}}, "charter.toml")
    assert "not a duration" in exc.value.message
    home = make_home(tmp_path / "h")
    home.config_path.write_text(home.config_path.read_text() + "\n[bus]\nbroken = \n")
    proc = charter(home, "up")
    assert proc.returncode == 1
    assert "charter.toml" in proc.stderr and "not valid TOML" in proc.stderr


def test_operator_flow_with_exit_codes(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    up = charter(home, "up", "--detach")
    assert up.returncode == 0, up.stderr
    try:
        again = charter(home, "up", "--detach")
        assert again.returncode != 0 and "already running" in again.stderr
        token = charter(home, "invite", "--role", "worker").stdout.strip()
        assert token.startswith("chi_")
        creds = tmp_path / "w.json"
        enrolled = charter(home, "enroll", "--token", token, "--name", "w1", "--creds", str(creds), "--json")
        assert enrolled.returncode == 0, enrolled.stderr
        charter_doc = json.loads(enrolled.stdout)["charter"]
        assert charter_doc["name"] == "w1" and charter_doc["role"] == "worker"
        assert creds.stat().st_mode & 0o777 == 0o600
        # A second enrolment with the same file path would overwrite a key: refused before any network call.
        assert charter(home, "enroll", "--token", token, "--name", "w2", "--creds", str(creds)).returncode != 0

        ok = charter(home, "publish", "agents.w1.events", '{"n": 1}', "--creds", str(creds), "--json")
        assert ok.returncode == 0, ok.stderr
        seq = json.loads(ok.stdout)["seq"]
        from_stdin = charter(home, "publish", "agents.w1.events", "-", "--creds", str(creds), "--json", stdin='{"n": 2}')
        assert json.loads(from_stdin.stdout)["seq"] > seq  # the daemon's own events may come between
        bad_json = charter(home, "publish", "agents.w1.events", "{nope", "--creds", str(creds))
        assert bad_json.returncode == 2 and "not JSON" in bad_json.stderr
        refused = charter(home, "publish", "tasks.assign", "{}", "--creds", str(creds))
        assert refused.returncode == 4 and "out_of_scope" in refused.stderr

        listing = json.loads(charter(home, "agents", "list", "--json").stdout)
        assert [a["name"] for a in listing] == ["w1"]
        shown = json.loads(charter(home, "agents", "show", "w1", "--json").stdout)
        assert shown["charter"]["scopes"]["publish"] == ["agents.w1.>", "tasks.results.>", "tasks.handoffs.*.w1"]
        assert charter(home, "agents", "show", "nobody").returncode == 4
        invites = json.loads(charter(home, "invites", "list", "--json").stdout)
        assert invites[0]["state"] == "used" and "token" not in invites[0]

        tail = charter(home, "tail", "agents.>", "--json")
        lines = [json.loads(line) for line in tail.stdout.splitlines()]
        assert [e["envelope"]["payload"] for e in lines] == [{"n": 1}, {"n": 2}]

        assert charter(home, "agents", "suspend", "w1").returncode == 0
        assert charter(home, "publish", "agents.w1.events", "{}", "--creds", str(creds)).returncode == 4
        assert charter(home, "agents", "resume", "w1").returncode == 0
        assert charter(home, "publish", "agents.w1.events", "{}", "--creds", str(creds)).returncode == 0

        rotated = json.loads(charter(home, "agents", "rotate-key", "--creds", str(creds), "--json").stdout)
        assert rotated["old_key_id"] != rotated["new_key_id"]
        assert charter(home, "publish", "agents.w1.events", "{}", "--creds", str(creds)).returncode == 0

        status = json.loads(charter(home, "status", "--json").stdout)
        assert status["agents"] == {"active": 1}
        assert status["counters"]["out_of_scope"] == 1
        verify = json.loads(charter(home, "log", "verify", "--json").stdout)
        assert verify["ok"] and verify["head_seq"] >= status["log"]["head_seq"]  # the daemon's own events go on
    finally:
        down = charter(home, "down")
        assert down.returncode == 0
    assert charter(home, "down").returncode == 3

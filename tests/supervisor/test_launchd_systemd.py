"""launchd and systemd: the commands built and the plist or unit written, against golden files
(tests/supervisor/golden/; regenerate with UPDATE_GOLDEN=1 and review the diff). The systemd path
runs for real where a user systemd answers, else it is skipped with the reason; launchd likewise on macOS.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from charter.config import Home
from charter.supervisor import install
from charter.supervisor.checks import CheckContext, launchd_print_argv, run_check, systemd_show_argv
from charter.supervisor.launchers import launchd_kickstart_argv, restart, restart_argv, systemd_restart_argv
from charter.supervisor.specs import parse_service

GOLDEN = Path(__file__).with_name("golden")
PYTHON = "/opt/charter/.venv/bin/python"
HOME = Path("/Users/op/.charter")


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"


def test_plist_and_unit_match_golden_files() -> None:
    plist = install.render_plist(PYTHON, HOME)
    golden("ai.charter.daemon.plist", plist)
    doc = plistlib.loads(plist.encode())
    assert doc["KeepAlive"] == {"SuccessfulExit": False} and doc["ThrottleInterval"] == 10 and doc["RunAtLoad"]
    assert doc["ProgramArguments"] == [PYTHON, "-m", "charter", "--home", str(HOME), "up"]
    unit = install.render_unit(PYTHON, Path("/home/op/.charter"))
    golden("charter.service", unit)
    assert "Restart=on-failure" in unit and "StartLimitBurst=5" in unit and "WantedBy=default.target" in unit


def test_install_plans_and_remediation_commands_match_golden() -> None:
    mac = install.plan(HOME, platform="darwin", python=PYTHON, uid=501, user_home=Path("/Users/op"))
    linux = install.plan(Path("/home/op/.charter"), platform="linux", python=PYTHON, uid=1000, user_home=Path("/home/op"))
    svc = parse_service({"label": "ai.activemirror.cloudflared", "check": {"kind": "launchd"}}, "x")
    daemon = parse_service({"label": "ai.activemirror.root", "check": {"kind": "launchd", "domain": "system"}}, "x")
    unit = parse_service({"label": "ai.mirrordna.agent", "check": {"kind": "systemd"}}, "x")
    sysunit = parse_service({"label": "systemd.system.nginx", "check": {"kind": "systemd", "unit": "nginx.service",
                                                                        "scope": "system"}}, "x")
    cmd = parse_service({"label": "ai.x.cmd", "check": {"kind": "tcp", "port": 1},
                         "restart": {"command": "brew services restart redis"}}, "x")
    doc = {
        "install": {"darwin": {"path": str(mac.path), "load": mac.load, "unload": mac.unload},
                    "linux": {"path": str(linux.path), "load": linux.load, "unload": linux.unload}},
        "check": {"launchd": launchd_print_argv("ai.activemirror.cloudflared", None, 501),
                  "launchd_system": launchd_print_argv("ai.activemirror.root", "system", 501),
                  "systemd_user": systemd_show_argv("ai.mirrordna.agent.service"),
                  "systemd_system": systemd_show_argv("nginx.service", "system")},
        "restart": {"launchd": restart_argv(svc), "launchd_system": restart_argv(daemon),
                    "systemd_user": restart_argv(unit), "systemd_system": restart_argv(sysunit),
                    "command": restart_argv(cmd)},
    }
    doc["restart"]["launchd"] = [a.replace(f"gui/{os.getuid()}/", "gui/UID/") for a in doc["restart"]["launchd"]]
    golden("commands.json", json.dumps(doc, indent=2) + "\n")
    assert launchd_kickstart_argv("ai.x", "gui/501") == ["launchctl", "kickstart", "-k", "gui/501/ai.x"]
    assert systemd_restart_argv("x.service") == ["systemctl", "--user", "restart", "x.service"]


def test_service_install_dry_run_prints_and_writes_nothing(home: Home) -> None:
    env = {**os.environ, "CHARTER_HOME": str(home.root), "HOME": str(home.root.parent)}
    done = subprocess.run([sys.executable, "-m", "charter", "service", "install", "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = install.plan(home.root).content if sys.platform == "darwin" else install.render_unit(sys.executable, home.root)
    assert done.stdout == expected
    assert "would write" in done.stderr and ("systemctl --user enable --now" in done.stderr or "bootstrap" in done.stderr)
    assert not (home.root.parent / ".config").exists() and not (home.root.parent / "Library").exists()
    as_json = subprocess.run([sys.executable, "-m", "charter", "service", "install", "--dry-run", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
    info = json.loads(as_json.stdout)
    assert info["dry_run"] and info["manager"] in ("launchd", "systemd") and info["content"] == expected


def user_systemd() -> str | None:
    """None if a user systemd answers here, else why not."""
    if sys.platform == "darwin" or shutil.which("systemctl") is None:
        return "no systemctl on this machine"
    try:
        done = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl --user failed: {exc}"
    state = (done.stdout or done.stderr).strip()
    if state in ("running", "degraded", "starting"):
        return None
    return f"no user systemd here (`systemctl --user is-system-running`: {state or done.returncode})"


@pytest.mark.anyio
async def test_systemd_for_real() -> None:
    why = user_systemd()
    if why:
        pytest.skip(why)
    unit = f"charter-test-{uuid.uuid4().hex[:8]}.service"
    path = Path.home() / ".config" / "systemd" / "user" / unit
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[Service]\nExecStart={shutil.which('sleep') or '/bin/sleep'} 600\n")
    ctx = CheckContext()
    svc = parse_service({"label": "ai.charter.test", "check": {"kind": "systemd", "unit": unit}}, "x")
    try:
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True, timeout=30)
        r = await run_check(svc, ctx)
        assert not r.ok and "inactive" in r.detail
        outcome = await restart(svc, None)
        assert outcome.ok and outcome.via == "systemd", outcome.detail
        time.sleep(0.5)
        r = await run_check(svc, ctx)
        assert r.ok and "active" in r.detail and r.data["MainPID"] not in ("0", None)
    finally:
        subprocess.run(["systemctl", "--user", "stop", unit], timeout=30)
        path.unlink(missing_ok=True)
        subprocess.run(["systemctl", "--user", "daemon-reload"], timeout=30)
        await ctx.close()


@pytest.mark.anyio
async def test_launchd_for_real() -> None:
    if sys.platform != "darwin":
        pytest.skip("launchd exists only on macOS")
    ctx = CheckContext()
    try:
        r = await run_check(parse_service({"label": "com.apple.Finder", "check": {"kind": "launchd"}}, "x"), ctx)
        assert r.ok, r.detail
    finally:
        await ctx.close()

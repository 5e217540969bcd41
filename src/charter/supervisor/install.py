"""`charter service install`: Charter itself as a launchd agent (macOS) or a systemd user unit (Linux),
so the daemon starts at login or boot and comes back if it crashes.

launchd: `~/Library/LaunchAgents/LABEL.plist` with RunAtLoad, KeepAlive {SuccessfulExit: false} (a
crash restarts it, `charter down` does not) and ThrottleInterval (at most one start every N seconds);
loaded with `launchctl bootstrap gui/UID PLIST`. systemd: `~/.config/systemd/user/charter.service`
with Restart=on-failure, RestartSec and a start limit; loaded with `systemctl --user daemon-reload`
and `systemctl --user enable --now`. For a user unit to run without a login session, the operator
runs `loginctl enable-linger` once (printed as a hint).

`render_plist` and `render_unit` are pure, so the tests compare them with golden files.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LABEL = "ai.charter.daemon"
UNIT = "charter.service"


@dataclass(frozen=True)
class Plan:
    manager: str  # launchd | systemd
    path: Path  # the file to write
    content: str
    load: list[list[str]]  # commands that load it
    unload: list[list[str]]  # commands that unload it
    hints: list[str]


def daemon_argv(python: str, home: Path) -> list[str]:
    return [python, "-m", "charter", "--home", str(home), "up"]


def render_plist(python: str, home: Path, *, label: str = LABEL, throttle: int = 10) -> str:
    doc = {
        "Label": label,
        "ProgramArguments": daemon_argv(python, home),
        "EnvironmentVariables": {"CHARTER_HOME": str(home)},
        "WorkingDirectory": str(home),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": throttle,
        "ProcessType": "Background",
        "StandardOutPath": str(home / "run" / "daemon.log"),
        "StandardErrorPath": str(home / "run" / "daemon.log"),
    }
    return plistlib.dumps(doc, sort_keys=True).decode()


def render_unit(python: str, home: Path, *, restart_sec: int = 5) -> str:
    cmd = " ".join(shlex.quote(a) for a in daemon_argv(python, home))
    return f"""[Unit]
Description=Charter: control plane for a fleet of AI agents ({home})
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=simple
ExecStart={cmd}
Environment=CHARTER_HOME={home}
WorkingDirectory={home}
Restart=on-failure
RestartSec={restart_sec}
TimeoutStopSec=20
KillMode=mixed

[Install]
WantedBy=default.target
"""


def plan(home: Path, *, platform: str | None = None, python: str | None = None, uid: int | None = None,
         user_home: Path | None = None) -> Plan:
    platform = platform or sys.platform
    python = python or sys.executable
    uid = os.getuid() if uid is None else uid
    user_home = user_home or Path.home()
    if platform == "darwin":
        path = user_home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        return Plan("launchd", path, render_plist(python, home),
                    load=[["launchctl", "bootstrap", f"gui/{uid}", str(path)],
                          ["launchctl", "enable", f"gui/{uid}/{LABEL}"]],
                    unload=[["launchctl", "bootout", f"gui/{uid}/{LABEL}"]],
                    hints=[f"logs: {home / 'run' / 'daemon.log'}", f"restart it: launchctl kickstart -k gui/{uid}/{LABEL}"])
    path = user_home / ".config" / "systemd" / "user" / UNIT
    return Plan("systemd", path, render_unit(python, home),
                load=[["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT]],
                unload=[["systemctl", "--user", "disable", "--now", UNIT]],
                hints=["to keep it running without a login session: loginctl enable-linger $USER",
                       f"logs: journalctl --user -u {UNIT} (and {home / 'run' / 'daemon.log'})"])


def install(p: Plan) -> list[dict[str, object]]:
    """Write the file (mode 0644, like any unit or agent) and run the load commands; results per command."""
    p.path.parent.mkdir(parents=True, exist_ok=True)
    p.path.write_text(p.content, encoding="utf-8")
    os.chmod(p.path, 0o644)
    return _run_all(p.load)


def uninstall(p: Plan) -> list[dict[str, object]]:
    results = _run_all(p.unload)
    p.path.unlink(missing_ok=True)
    if p.manager == "systemd":
        results += _run_all([["systemctl", "--user", "daemon-reload"]])
    return results


def _run_all(cmds: list[list[str]]) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for argv in cmds:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            results.append({"command": argv, "exit": done.returncode, "output": (done.stdout + done.stderr).strip()[-500:]})
        except (OSError, subprocess.TimeoutExpired) as exc:
            results.append({"command": argv, "exit": None, "output": str(exc)})
    return results

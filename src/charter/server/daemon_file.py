"""The running daemon's record (`run/daemon.json`) and its dashboard token, read without uvicorn.

The CLI reads these on nearly every command; `charter.server.daemon` imports uvicorn, which a
command that only talks to the daemon has no use for.
"""

from __future__ import annotations

import json
from typing import Any

import psutil

from charter.config import Home


def dashboard_token(home: Home) -> str | None:
    """The running daemon's dashboard login token (a fresh one each start), if any."""
    try:
        return (home.run_dir / "dashboard.token").read_text().strip() or None
    except FileNotFoundError:
        return None


def read_daemon_file(home: Home) -> dict[str, Any] | None:
    """The running daemon's record, or None if there is none or its process is gone."""
    try:
        info = json.loads(home.daemon_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        # After a reboot the pid may belong to an unrelated process: it must be a charter daemon.
        if "charter" not in " ".join(proc.cmdline()):
            return None
    except psutil.Error:
        return None
    return info

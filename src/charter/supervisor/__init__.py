"""The supervisor: services watched, restarted and reported; agents launched in their sandboxes.

  specs       service specs (charter.toml `[[services]]`, CHARTER_HOME/services/*.toml), validated
  checks      launchd, systemd, process, tcp, http, command, model (deep probe), freshness
  policy      exponential backoff with a cap; a start limit per window; thresholds
  manager     processes Charter runs itself: start, stop, restart, env, cwd, rotated logs
  launchers   remediation: launchctl kickstart, systemctl restart, a command, or Charter's own
  history     state changes, restarts, checks and uptime in charter.db
  supervisor  `Supervisor`, the component the daemon runs
  importers   launchd plists, systemd units and a service registry JSON -> service specs
  run         `charter run AGENT -- CMD`: a sandboxed agent process
  install     `charter service install`: Charter itself as a launchd agent or systemd user unit

`charter.config` imports `specs`, so this package imports nothing heavy at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charter.supervisor.supervisor import Supervisor

__all__ = ["Supervisor"]


def __getattr__(name: str) -> Any:
    if name == "Supervisor":
        from charter.supervisor.supervisor import Supervisor

        return Supervisor
    raise AttributeError(name)

"""Remediation through the manager that owns a service.

  charter   Charter's own managed process (`manager.ManagedProcess`): stop, then start
  launchd   `launchctl kickstart -k gui/UID/LABEL` (kill the running instance and start it again)
  systemd   `systemctl --user restart UNIT` (or without --user for a system unit)
  command   `restart.command`, run to completion under the service's timeout
  none      watched only; never restarted

`restart_argv` is pure, so the command lines are tested against golden files on any OS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from charter.supervisor.checks import launchd_domain, run_argv
from charter.supervisor.specs import ServiceConfig

if TYPE_CHECKING:
    from charter.supervisor.manager import ManagedProcess


def launchd_kickstart_argv(label: str, domain: str | None = None) -> list[str]:
    return ["launchctl", "kickstart", "-k", f"{launchd_domain(domain)}/{label}"]


def systemd_restart_argv(unit: str, scope: str = "user") -> list[str]:
    return ["systemctl", *(["--user"] if scope == "user" else []), "restart", unit]


def restart_argv(spec: ServiceConfig) -> list[str] | None:
    """The command that restarts `spec` through its manager (None for Charter's own or none)."""
    m = spec.effective_manager
    if m == "launchd":
        return launchd_kickstart_argv(spec.launchd_label(), spec.check.domain if spec.check else None)
    if m == "systemd":
        return systemd_restart_argv(spec.systemd_unit(), spec.systemd_scope())
    if m == "command":
        return list(spec.restart.command or [])
    return None


@dataclass
class Outcome:
    ok: bool
    detail: str
    via: str


async def restart(spec: ServiceConfig, managed: ManagedProcess | None) -> Outcome:
    """Restart the service through its manager; never raises."""
    m = spec.effective_manager
    if m == "none":
        return Outcome(False, "no manager can restart this service (manager = \"none\")", m)
    if m == "charter":
        if managed is None:
            return Outcome(False, "Charter does not run this service's process", m)
        try:
            pid = await managed.restart()
        except OSError as exc:
            return Outcome(False, f"could not start {spec.command}: {exc}", m)
        return Outcome(True, f"started pid {pid}", m)
    argv = restart_argv(spec)
    assert argv is not None
    try:
        rc, out = await run_argv(argv, max(spec.timeout, 30.0))
    except FileNotFoundError:
        return Outcome(False, f"{argv[0]} is not available on this machine", m)
    except TimeoutError:
        return Outcome(False, f"`{' '.join(argv)}` did not finish in time", m)
    tail = out.strip()[-200:]
    return Outcome(rc == 0, f"`{' '.join(argv)}` exited {rc}" + (f": {tail}" if tail else ""), m)

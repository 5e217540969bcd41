"""`charter services`, `charter service install`, `charter run AGENT -- CMD...`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from charter.cli import common
from charter.cli.common import emit_json, err, fail, out, run, state
from charter.cli.operator import OperatorClient
from charter.errors import CharterError

services_app = typer.Typer(help="Supervised services: list, check, restart, reset, stop, start, history, import, reload.",
                           no_args_is_help=True)
import_app = typer.Typer(help="Import services the operator already has: launchd plists, systemd units, a registry JSON.",
                         no_args_is_help=True)
service_app = typer.Typer(help="Charter itself as a service: install or uninstall the launchd agent / systemd user unit.",
                          no_args_is_help=True)
services_app.add_typer(import_app, name="import")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
COLOUR = {"passing": "green", "starting": "yellow", "unknown": "dim", "critical": "red", "failed": "bold red",
          "stopped": "dim"}


async def _admin(method: str, path: str, **kw: Any) -> Any:
    async with OperatorClient(state.home) as client:
        return await client.call(method, path, **kw)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    import time

    s = max(time.time() - ts, 0)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _state(s: dict[str, Any]) -> str:
    return f"[{COLOUR.get(s['state'], 'white')}]{s['state']}[/]"


@services_app.command("list")
def services_list(as_json: JsonOpt = False) -> None:
    """Every service: state, tier, check, last checked, uptime, restarts."""
    data = run(lambda: _admin("GET", "/v1/admin/services"))
    rows = data["services"]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print("No services are supervised. Add [[services]] to charter.toml or files to "
                  f"{state.home.root / 'services'}, or `charter services import ...`.")
        return
    table = Table("label", "state", "tier", "check", "checked", "uptime 24h", "restarts", "reason")
    for s in rows:
        table.add_row(s["label"], _state(s), s["tier"], s["check"], _ago(s["last_checked"]), _pct(s.get("uptime_24h")),
                      str(s["restarts"]), common.escape((s["reason"] or "")[:70]))
    out.print(table)


@services_app.command("check")
def services_check(label: str, as_json: JsonOpt = False) -> None:
    """Check LABEL now and show the result (exit 1 if it fails)."""
    s = run(lambda: _admin("POST", f"/v1/admin/services/{label}/check"))
    if as_json:
        emit_json(s)
    else:
        r = s["result"] or {}
        mark = "[green]ok[/green]" if r.get("ok") else "[red]fail[/red]"
        out.print(f"{mark} {s['label']} ({s['check']}, {r.get('ms', 0):.1f} ms): {common.escape(r.get('detail', ''))}")
        out.print(f"state {_state(s)} since {_ago(s['since'])}; run {s['run_id']}")
    if not (s["result"] or {}).get("ok"):
        raise SystemExit(common.ERROR)


@services_app.command("restart")
def services_restart(label: str, as_json: JsonOpt = False) -> None:
    """Restart LABEL through its manager now; clears `failed` and the start-limit window."""
    s = run(lambda: _admin("POST", f"/v1/admin/services/{label}/restart"))
    if as_json:
        emit_json(s)
    else:
        mark = "[green]restarted[/green]" if s["restarted"] else "[red]restart failed[/red]"
        out.print(f"{mark} {s['label']} via {s['via']}: {common.escape(s['detail'])}; state {_state(s)}")
    if not s["restarted"]:
        raise SystemExit(common.ERROR)


@services_app.command("reset")
def services_reset(label: str, as_json: JsonOpt = False) -> None:
    """Clear `failed` and the start-limit window of LABEL without restarting it (systemctl reset-failed); check it now."""
    s = run(lambda: _admin("POST", f"/v1/admin/services/{label}/reset"))
    emit_json(s) if as_json else out.print(f"{s['label']} is {_state(s)}: {common.escape(s['reason'])}")


@services_app.command("stop")
def services_stop(label: str, as_json: JsonOpt = False) -> None:
    """Stop a process Charter runs; it stays stopped (not checked, not restarted) until `start`."""
    s = run(lambda: _admin("POST", f"/v1/admin/services/{label}/stop"))
    emit_json(s) if as_json else out.print(f"{s['label']} is {_state(s)}.")


@services_app.command("start")
def services_start(label: str, as_json: JsonOpt = False) -> None:
    """Start a process Charter runs (after `stop`, or one that is not running)."""
    s = run(lambda: _admin("POST", f"/v1/admin/services/{label}/start"))
    emit_json(s) if as_json else out.print(f"{s['label']} is {_state(s)}: {common.escape(s['reason'])}")


@services_app.command("history")
def services_history(
    label: str,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many records, newest first.", min=1)] = 30,
    checks: Annotated[bool, typer.Option("--checks/--no-checks", help="Include every check result.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """State changes, restarts and alerts of LABEL (and check results with --checks); uptime."""
    kinds = "state,restart,alert" + (",check" if checks else "")
    h = run(lambda: _admin("GET", f"/v1/admin/services/{label}/history", params={"limit": limit, "kind": kinds}))
    if as_json:
        emit_json(h)
        return
    up = h["uptime"]
    out.print(f"[bold]{h['label']}[/bold] is {h['state']}; uptime " + ", ".join(f"{w} {_pct(v)}" for w, v in up.items()))
    table = Table("when", "what", "state", "status", "detail")
    for r in h["history"]:
        import datetime as dt

        when = dt.datetime.fromtimestamp(r["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, r["kind"], r["state"] or "", r["status"] or "", common.escape((r["detail"] or "")[:90]))
    out.print(table)


@services_app.command("reload")
def services_reload(as_json: JsonOpt = False) -> None:
    """Re-read the service specs (charter.toml and CHARTER_HOME/services/*.toml) without restarting the daemon."""
    r = run(lambda: _admin("POST", "/v1/admin/services/reload"))
    if as_json:
        emit_json(r)
    else:
        out.print("reloaded: " + "; ".join(f"{k} {', '.join(v) or '-'}" for k, v in r.items()))


def _known_labels() -> set[str]:
    from charter.supervisor.specs import read_folder

    home = state.home
    known = {s.label for s in read_folder(home.root / "services")}
    if home.config_path.exists():
        known |= {s.label for s in home.load_config().services}
    return known


def _finish_import(imported: Any, dry_run: bool, as_json: bool) -> None:
    from charter.supervisor.importers import write_imported
    from charter.supervisor.specs import dumps_toml

    if dry_run:
        if as_json:
            emit_json(imported.to_dict())
        else:
            sys.stdout.write(dumps_toml(imported.services) + "\n")
            for s in imported.skipped:
                err.print(f"[yellow]skipped[/yellow] {common.escape(s['what'])}: {common.escape(s['why'])}")
        return
    try:
        path, written, dup = write_imported(state.home.root / "services", imported, _known_labels())
    except CharterError as exc:
        fail(exc)
    result = {**imported.to_dict(), "file": str(path) if path else None, "written": written, "already_declared": dup}
    if as_json:
        emit_json(result)
        return
    for s in imported.skipped:
        err.print(f"[yellow]skipped[/yellow] {common.escape(s['what'])}: {common.escape(s['why'])}")
    if dup:
        out.print(f"already declared: {', '.join(dup)}")
    if written:
        out.print(f"imported {len(written)} service(s) into {path}: {', '.join(written)}")
        out.print("Apply with [bold]charter services reload[/bold] (or restart the daemon).")
    elif not dup:
        out.print("nothing to import")


DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the service specs instead of writing them.")]


@import_app.command("launchd")
def import_launchd(
    prefix: Annotated[str, typer.Option(help="Import plists whose Label starts with this, e.g. ai.activemirror.")],
    directory: Annotated[Optional[list[Path]], typer.Option("--dir", help="Where the plists are (default: ~/Library/LaunchAgents, /Library/LaunchAgents, /Library/LaunchDaemons).")] = None,
    dry_run: DryRun = False,
    as_json: JsonOpt = False,
) -> None:
    """launchd jobs by label prefix: checked with launchctl print, restarted with launchctl kickstart -k."""
    from charter.supervisor.importers import import_launchd as imp

    _finish_import(imp(prefix, directory or None), dry_run, as_json)


@import_app.command("systemd")
def import_systemd(
    pattern: Annotated[str, typer.Option(help="Unit files to import (a glob).")] = "*.service",
    scope: Annotated[str, typer.Option(help="user or system.")] = "user",
    directory: Annotated[Optional[list[Path]], typer.Option("--dir", help="Where the units are (default: ~/.config/systemd/user, or /etc/systemd/system).")] = None,
    dry_run: DryRun = False,
    as_json: JsonOpt = False,
) -> None:
    """systemd units: checked with systemctl show, restarted with systemctl restart."""
    from charter.supervisor.importers import import_systemd as imp

    if scope not in ("user", "system"):
        fail(CharterError("bad_request", "scope is user or system", "scope"), common.USAGE)
    _finish_import(imp(pattern, scope, directory or None), dry_run, as_json)


@import_app.command("registry")
def import_registry(
    path: Annotated[Path, typer.Argument(help='A JSON file {"services": [{name, label, port, health_url, category}]}.')],
    manager: Annotated[Optional[str], typer.Option(help="Who restarts them: launchd, systemd or none (default: launchd on macOS, else none).")] = None,
    dry_run: DryRun = False,
    as_json: JsonOpt = False,
) -> None:
    """A service registry JSON: an http check on health_url, else tcp on port."""
    from charter.supervisor.importers import import_registry as imp

    if manager not in (None, "launchd", "systemd", "none"):
        fail(CharterError("bad_request", "manager is launchd, systemd or none", "manager"), common.USAGE)
    try:
        imported = imp(path, manager)
    except CharterError as exc:
        fail(exc, common.ERROR)
    _finish_import(imported, dry_run, as_json)


# -- charter service install -------------------------------------------------------------------


@service_app.command("install")
def service_install(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the file and the commands; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Install Charter as a launchd agent (macOS) or a systemd user unit (Linux) and load it."""
    from charter.supervisor.install import install, plan

    if not state.home.exists():
        fail(CharterError("not_initialised", f"{state.home.root} is not a Charter home; run `charter init`"), common.UNREACHABLE)
    p = plan(state.home.root)
    info: dict[str, Any] = {"manager": p.manager, "path": str(p.path), "content": p.content, "load": p.load,
                            "hints": p.hints, "dry_run": dry_run}
    if dry_run:
        if as_json:
            emit_json(info)
            return
        err.print(f"# would write {p.path}")
        sys.stdout.write(p.content)
        err.print("# then run:")
        for c in p.load:
            err.print("  " + " ".join(c))
        return
    results = install(p)
    info["results"] = results
    if as_json:
        emit_json(info)
    else:
        out.print(f"wrote {p.path}")
        for r in results:
            mark = "[green]ok[/green]" if r["exit"] == 0 else "[red]failed[/red]"
            out.print(f"{mark} {' '.join(r['command'])}" + (f": {common.escape(str(r['output']))}" if r["exit"] != 0 else ""))
        for h in p.hints:
            out.print(f"[dim]{h}[/dim]")
    if any(r["exit"] != 0 for r in results):
        raise SystemExit(common.ERROR)


@service_app.command("uninstall")
def service_uninstall(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be done; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Unload and remove the launchd agent or systemd user unit."""
    from charter.supervisor.install import plan, uninstall

    p = plan(state.home.root)
    if dry_run:
        info = {"manager": p.manager, "path": str(p.path), "unload": p.unload, "dry_run": True}
        if as_json:
            emit_json(info)
        else:
            for c in p.unload:
                out.print(" ".join(c))
            out.print(f"rm {p.path}")
        return
    results = uninstall(p)
    emit_json({"path": str(p.path), "results": results}) if as_json else out.print(f"removed {p.path}")


# -- charter run -------------------------------------------------------------------------------


def run_command(
    agent: Annotated[str, typer.Argument(help="The agent's name or id.")],
    cmd: Annotated[Optional[list[str]], typer.Argument(help="The command, after --.")] = None,
    creds: Annotated[Optional[Path], typer.Option("--creds", help="The agent's credentials (default ./NAME.creds.json or CHARTER_HOME/agents/NAME.creds.json).")] = None,
    cpu: Annotated[Optional[str], typer.Option(help="CPU time limit, e.g. 10m (default supervisor.run_cpu).")] = None,
    memory: Annotated[Optional[str], typer.Option(help="Address-space limit, e.g. 512MiB (default supervisor.run_memory).")] = None,
    files: Annotated[Optional[int], typer.Option(help="Open-file limit (default supervisor.run_files).", min=16)] = None,
    jail: Annotated[Optional[str], typer.Option(help="auto (bubblewrap if installed), always, or never (default supervisor.run_jail).")] = None,
    network: Annotated[bool, typer.Option("--network/--no-network", help="With the jail: keep or cut the network.")] = True,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="K=V added to the scrubbed environment (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run (argv, limits, env names) as JSON.")] = False,
) -> None:
    """Run CMD as AGENT: in its sandbox, scrubbed environment + CHARTER_CREDS, resource limits, a bubblewrap jail.

    Example: charter run alpha -- python agent.py
    """
    from charter.supervisor.run import Limits, launch, prepare
    from charter.units import parse_duration, parse_size

    try:
        cfg = state.home.load_config().supervisor
        extra = {}
        for item in env or []:
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise CharterError("bad_request", f"--env wants K=V, got {item!r}", "env")
            extra[k] = v
        limits = Limits(int(parse_duration(cpu) if cpu else cfg.run_cpu), parse_size(memory) if memory else cfg.run_memory,
                        files or cfg.run_files)
        mode = jail or cfg.run_jail
        if mode not in ("auto", "always", "never"):
            raise CharterError("bad_request", "--jail is auto, always or never", "jail")
        p = prepare(state.home, agent, list(cmd or []), creds=creds, limits=limits, jail=mode, network=network,
                    extra_env=extra)
    except ValueError as exc:
        fail(CharterError("bad_request", str(exc)), common.USAGE)
    except CharterError as exc:
        fail(exc, common.USAGE if exc.code == "bad_request" else None)
    if dry_run:
        emit_json(p.describe())
        return
    if not p.jailed and mode == "auto":
        err.print(f"[dim]note: no jail ({common.escape(str(p.agent.get('jail_problem')))}): running with the "
                  "resource limits and the sandbox as working directory only[/dim]")
    try:
        code = launch(p)
    except CharterError as exc:
        fail(exc)
    raise SystemExit(code)

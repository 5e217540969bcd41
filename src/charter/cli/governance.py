"""`charter policy`, `charter approvals`, `charter budget`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from charter.cli import common
from charter.cli.common import emit_json, err, fail, ms_iso, out, run, state
from charter.cli.operator import OperatorClient
from charter.errors import CharterError

policy_app = typer.Typer(help="Policies: lint, test, explain a decision.", no_args_is_help=True)
approvals_app = typer.Typer(help="Risky actions waiting for the operator: list, approve, deny.", no_args_is_help=True)
budget_app = typer.Typer(help="Budgets: show what is used and left, set limits, spend history.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]


async def _admin(method: str, path: str, **kw: Any) -> Any:
    async with OperatorClient(state.home) as client:
        return await client.call(method, path, **kw)


# -- policy ------------------------------------------------------------------------------------


@policy_app.command("lint")
def policy_lint(
    files: Annotated[Optional[list[Path]], typer.Argument(help="Policy files (default: every file in CHARTER_HOME/policies).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check policy files; every problem names its file and line. Exit 1 if there is an error."""
    from charter.policy.store import lint_text

    paths = files or sorted(state.home.policies_dir.glob("*.toml"))
    if not paths:
        fail(CharterError("not_found", f"no policy files in {state.home.policies_dir}"), common.ERROR)
    problems = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            fail(CharterError("not_found", f"cannot read {p}: {exc}"), common.ERROR)
        problems += lint_text(text, str(p), p.stem)[0]
    errors = [p for p in problems if p.severity == "error"]
    if as_json:
        emit_json({"files": [str(p) for p in paths], "problems": [p.__dict__ | {"text": str(p)} for p in problems]})
    else:
        for p in problems:
            colour = "red" if p.severity == "error" else "yellow"
            out.print(f"{p.file}:{p.line}: [{colour}]{p.severity}[/{colour}]: {common.escape(p.message)}", highlight=False)
        if not problems:
            out.print(f"[green]ok[/green] {len(paths)} polic{'y' if len(paths) == 1 else 'ies'}, no problems")
    if errors:
        raise SystemExit(common.ERROR)


@policy_app.command("test")
def policy_test(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Test files (default: CHARTER_HOME/policies/tests/*.toml).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run policy unit tests kept in files. Exit 1 if a case fails."""
    from charter.policy.testing import run_file

    try:
        config = state.home.load_config()
    except CharterError as exc:
        fail(exc)
    files = paths or sorted((state.home.policies_dir / "tests").glob("*.toml"))
    if not files:
        fail(CharterError("not_found", f"no policy tests in {state.home.policies_dir / 'tests'}"), common.ERROR)
    results = []
    for f in files:
        try:
            results += run_file(f, state.home.policies_dir, config)
        except CharterError as exc:
            fail(exc, common.ERROR)
    passed = sum(r.ok for r in results)
    failed = len(results) - passed
    if as_json:
        emit_json({"passed": passed, "failed": failed, "cases": [r.to_dict() for r in results]})
    else:
        for r in results:
            mark = "[green]PASS[/green]" if r.ok else "[red]FAIL[/red]"
            out.print(f"{mark} {Path(r.file).name}: {common.escape(r.name)}" + ("" if r.ok else f"\n     {common.escape(r.detail)}"),
                      highlight=False)
        out.print(f"{passed} passed, {failed} failed")
    if failed:
        raise SystemExit(common.ERROR)


@policy_app.command("explain")
def policy_explain(
    agent: Annotated[str, typer.Option(help="Agent name or id.")],
    action: Annotated[str, typer.Option(help="Action, e.g. model.call or fs.write.")],
    attrs: Annotated[str, typer.Option(help="The action's attributes as a JSON object.")] = "{}",
    as_json: JsonOpt = False,
) -> None:
    """The decision the agent's bound policy gives for an action, and the path to it."""
    try:
        values = json.loads(attrs)
    except ValueError as exc:
        fail(CharterError("malformed", f"--attrs is not JSON: {exc}", "attrs"), common.USAGE)
    d = run(lambda: _admin("POST", "/v1/admin/policy/explain", json={"agent": agent, "action": action, "attrs": values}))
    if as_json:
        emit_json(d)
        return
    colour = {"allow": "green", "deny": "red", "approve": "yellow"}[d["effect"]]
    p = d["policy"]
    out.print(f"[bold {colour}]{d['effect']}[/]  {d['agent']} -> {d['action']}  (tier {d['tier'] or '-'}, rule {d['rule'] or '-'})")
    out.print(f"reason: {common.escape(d['reason'])}")
    out.print(f"policy: {p['id']} v{p['version']} sha256:{p['hash'][:16]}…" + ("" if d["policy_current"] else
              " [yellow](not the current file's text: renew the charter to rebind)[/yellow]"))
    out.print(f"role max tier: {d['max_tier']}")
    for i, step in enumerate(d["path"], 1):
        out.print(f"  {i}. {common.escape(step)}", highlight=False)


# -- approvals ---------------------------------------------------------------------------------


@approvals_app.command("list")
def approvals_list(
    state_: Annotated[Optional[str], typer.Option("--state", help="pending, approved, denied, expired or used.")] = "pending",
    all_: Annotated[bool, typer.Option("--all", help="Every state.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Approval requests (pending ones by default)."""
    from charter.policy.approvals import STATES

    if not all_ and state_ not in STATES:
        fail(CharterError("bad_request", f"unknown --state {state_!r}: use one of {', '.join(STATES)}, or --all",
                          "--state"), common.USAGE)
    params = {} if all_ else {"state": state_}
    rows = run(lambda: _admin("GET", "/v1/admin/approvals", params=params))["approvals"]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print("No approvals" + ("" if all_ else f" in state {state_}") + ".")
        return
    table = Table("id", "agent", "action", "tier", "rule", "state", "expires", "attrs")
    for a in rows:
        table.add_row(a["id"], a["agent_name"], a["action"], a["tier"] or "-", a["rule"] or "-", a["state"],
                      ms_iso(a["expires_at"]), json.dumps(a["attrs"])[:60])
    out.print(table)


def _decide(approval_id: str, verdict: str, window: str | None, note: str, as_json: bool) -> None:
    from charter.identity.keys import SigningKey
    from charter.policy.approvals import decision_document, sign_decision
    from charter.units import parse_duration

    try:
        window_s = parse_duration(window) if window else None
    except ValueError as exc:
        fail(CharterError("bad_request", str(exc), "window"), common.USAGE)
    key = SigningKey.load_pem(state.home.root_key_path)
    doc = sign_decision(key, decision_document(approval_id, verdict, window_s, note))
    a = run(lambda: _admin("POST", f"/v1/admin/approvals/{approval_id}/decide", json=doc))
    if as_json:
        emit_json(a)
        return
    extra = f" until {ms_iso(a['window_until'])}" if a.get("window_until") else ""
    out.print(f"{a['id']}: {a['agent_name']} {a['action']} is now [bold]{a['state']}[/bold]{extra}.")


@approvals_app.command("approve")
def approvals_approve(
    approval_id: str,
    window: Annotated[Optional[str], typer.Option(help="Approve this agent and action for a window, e.g. 1h.")] = None,
    note: Annotated[str, typer.Option(help="Kept with the signed decision.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Approve a waiting action, signed with the root key (once, or for a --window)."""
    _decide(approval_id, "approve", window, note, as_json)


@approvals_app.command("deny")
def approvals_deny(
    approval_id: str,
    note: Annotated[str, typer.Option(help="Kept with the signed decision.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Deny a waiting action, signed with the root key."""
    _decide(approval_id, "deny", None, note, as_json)


# -- budget ------------------------------------------------------------------------------------


def _amount(unit: str, value: int) -> str:
    return f"${value / 1e6:,.4f}" if unit == "usd" else f"{value:,} tok"


@budget_app.command("show")
def budget_show(as_json: JsonOpt = False) -> None:
    """Every budget with what is committed, reserved and left in the current period."""
    data = run(lambda: _admin("GET", "/v1/admin/budget"))
    if as_json:
        emit_json(data)
        return
    table = Table("scope", "period", "unit", "limit", "committed", "reserved", "left", "used")
    for b in data["budgets"]:
        used = (b["committed"] + b["reserved"]) / b["hard"] if b["hard"] else 0.0
        colour = "red" if used >= 1 else "yellow" if used >= b["soft_ratio"] else "green"
        table.add_row(b["name"], f"{b['period']} {b['period_key']}", b["unit"], _amount(b["unit"], b["hard"]),
                      _amount(b["unit"], b["committed"]), _amount(b["unit"], b["reserved"]),
                      _amount(b["unit"], b["left"]) if not b.get("over") else f"[red]{_amount(b['unit'], b['over'])} over[/]",
                      f"[{colour}]{used:.0%}[/]")
    out.print(table)
    err.print(f"[dim]periods aligned to {data['timezone']}[/dim]")


@budget_app.command("set")
def budget_set(
    scope: Annotated[str, typer.Option(help="global, role:NAME or agent:NAME.")],
    limit: Annotated[Optional[float], typer.Option(help="The hard limit: dollars for usd, a count for tokens "
                                                        "(not needed with --remove).")] = None,
    unit: Annotated[str, typer.Option(help="usd or tokens.")] = "usd",
    period: Annotated[str, typer.Option(help="hour, day, month or total.")] = "day",
    soft: Annotated[Optional[float], typer.Option(help="Alert when this fraction is used (default from config).")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove this limit instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set (or remove) a hard limit for a scope, unit and period."""
    if limit is None and not remove:
        fail(CharterError("bad_request", "--limit is required to set a limit (or give --remove)", "--limit"),
             common.USAGE)
    body: dict[str, Any] = {"scope": scope, "unit": unit, "period": period, "remove": remove}
    if limit is not None:
        body["limit"] = limit
    if soft is not None:
        body["soft_ratio"] = soft
    lim = run(lambda: _admin("PUT", "/v1/admin/budget", json=body))
    if as_json:
        emit_json(lim)
    else:
        if remove:
            out.print(f"removed: {lim['scope']} {lim['period']} {lim['unit']} limit")
        else:
            out.print(f"set: {lim['scope']} {lim['period']} {lim['unit']} limit {_amount(lim['unit'], lim['hard'])}")


@budget_app.command("history")
def budget_history(
    by: Annotated[str, typer.Option(help="Group by day, agent, model or role.")] = "day",
    agent: Annotated[Optional[str], typer.Option(help="Only this agent.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Settled spend grouped by day, agent, model or role."""
    params = {"by": by, "agent": agent}
    data = run(lambda: _admin("GET", "/v1/admin/budget/history", params=params))
    if as_json:
        emit_json(data)
        return
    table = Table(by, "calls", "usd", "tokens in", "tokens out", "overruns")
    for r in data["history"]:
        table.add_row(str(r.get("name", r[by])), str(r["calls"]), f"${(r['usd_micros'] or 0) / 1e6:,.4f}",
                      f"{r['tokens_in'] or 0:,}", f"{r['tokens_out'] or 0:,}", str(r["overruns"] or 0))
    out.print(table)

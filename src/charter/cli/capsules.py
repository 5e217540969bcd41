"""`charter capsule` and `charter reflect`."""

from __future__ import annotations

import difflib

from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from charter.cli import common
from charter.cli.common import emit_json, err, fail, out, run, state
from charter.cli.operator import OperatorClient
from charter.errors import CharterError

capsule_app = typer.Typer(help="Capsules: context documents rebuilt from the live system.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
CRITICAL = 6  # exit code of `charter reflect` while a critical contradiction stands


async def _admin(method: str, path: str, **kw: Any) -> Any:
    async with OperatorClient(state.home) as client:
        return await client.call(method, path, **kw)


@capsule_app.command("build")
def capsule_build(
    name: Annotated[str, typer.Argument(help="AI_ALIGNMENT, OPS_STATUS, AGENT or a spec of yours.")] = "AI_ALIGNMENT",
    agent: Annotated[Optional[str], typer.Option(help="For per-agent capsules: the agent.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a capsule now and print where it was written."""
    body: dict[str, Any] = {"name": name}
    if agent:
        body["agent"] = agent
    built = run(lambda: _admin("POST", "/v1/admin/capsules/build", json=body))
    if as_json:
        emit_json({k: v for k, v in built.items() if k != "markdown"})
        return
    m = built["meta"]
    out.print(f"built {built['capsule']}: {built['path']}")
    out.print(f"  bus entries {m['seq_from']}–{m['seq_to']}, sha256 {m['content_sha256'][:16]}…, signed by {m['signed_by']}")


@capsule_app.command("show")
def capsule_show(
    name: Annotated[str, typer.Argument(help="Capsule name.")] = "AI_ALIGNMENT",
    agent: Annotated[Optional[str], typer.Option(help="For per-agent capsules: the agent.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the latest build of a capsule."""
    params = {"name": name, "agent": agent}
    data = run(lambda: _admin("GET", "/v1/admin/capsules/show", params=params))
    if as_json:
        emit_json(data)
    else:
        print(data["markdown"])


@capsule_app.command("list")
def capsule_list(as_json: JsonOpt = False) -> None:
    """Capsules on disk, their age and their dated history."""
    data = run(lambda: _admin("GET", "/v1/admin/capsules"))
    if as_json:
        emit_json(data)
        return
    table = Table("capsule", "agent", "age", "history", "path")
    for c in data["capsules"]:
        table.add_row(c["name"], c["agent"] or "-", f"{c['age_s']:.0f}s", ", ".join(c["history"][-3:]), c["path"])
    out.print(table)


@capsule_app.command("diff")
def capsule_diff(
    name: Annotated[str, typer.Argument(help="Capsule name.")] = "AI_ALIGNMENT",
    agent: Annotated[Optional[str], typer.Option(help="For per-agent capsules: the agent.")] = None,
    against: Annotated[Optional[str], typer.Option(
        help="An earlier build: a day (YYYY-MM-DD) or a build stamp from `capsule list --json`; "
             "default: the build before the latest.")] = None,
) -> None:
    """What changed between the latest capsule and an earlier build (unified diff; exit 0 either way)."""
    base = state.home.root / "capsules"
    if agent:
        base = base / "agents" / agent
    latest = base / f"{name}_LATEST.md"
    history = base / f"{name}_CAPSULES"
    if not latest.exists():
        what = f"{name} --agent {agent}" if agent else name
        fail(CharterError("not_found", f"{latest} does not exist; run `charter capsule build {what}`", "name"),
             common.REFUSED)
    now = latest.read_bytes()
    if against:
        candidates = [history / f"{against}.md", history / "builds" / f"{against}.md"]
        other = next((c for c in candidates if c.exists()), None)
        if other is None:
            days = sorted(p.stem for p in history.glob("*.md"))
            fail(CharterError("not_found", f"--against {against!r}: no such build of {name}; days kept: "
                                           f"{', '.join(days[-5:]) or 'none'} (and stamps in `capsule list --json`)",
                              "against"), common.REFUSED)
    else:
        earlier = [h for h in sorted((history / "builds").glob("*.md")) + sorted(history.glob("*.md"))
                   if h.read_bytes() != now]
        builds = [h for h in earlier if h.parent.name == "builds"]
        other = builds[-1] if builds else (earlier[-1] if earlier else None)
    if other is None:
        err.print("No earlier build differs from the latest.")
        return
    lines = difflib.unified_diff(other.read_text().splitlines(), now.decode().splitlines(),
                                 str(other), str(latest), lineterm="")
    for line in lines:
        print(line)


reflect_app = typer.Typer(help="Check every declared truth against the live system; exit 6 while a critical "
                                "contradiction stands.", invoke_without_command=True)


@reflect_app.callback()
def reflect_command(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Check every declared truth against the live system; exit 6 while a critical contradiction stands."""
    if ctx.invoked_subcommand is not None:
        return
    data = run(lambda: _admin("GET", "/v1/admin/reflect"))
    if as_json:
        emit_json(data)
    elif data["ok"]:
        out.print(f"[green]ok[/green] all {len(data['truths'])} truths hold")
    else:
        table = Table("severity", "truth", "evidence", "since", "fix")
        colour = {"critical": "red", "warning": "yellow", "info": "blue"}
        for c in data["contradictions"]:
            table.add_row(f"[{colour[c['severity']]}]{c['severity']}[/]", *(common.escape(c[k]) for k in ("claim", "evidence", "since_iso", "fix")))
        out.print(table)
    if data["critical"]:
        raise SystemExit(CRITICAL)





@reflect_app.command("ack")
def reflect_ack(
    seq: Annotated[int, typer.Argument(help="The log sequence number of the T3 action (the contradiction's evidence).", min=1)],
    note: Annotated[str, typer.Option("--note", help="Why it is acceptable; kept in the log.")],
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge a T3 action that ran without a valid approval (an operator-signed event).

    A later approval cannot clear it, since the action already ran; revoke the agent instead when
    it was not expected."""
    if not note.strip():
        fail(CharterError("bad_request", "--note is empty: say why the action is acknowledged (it stays in the log)",
                          "note"), common.USAGE)
    data = run(lambda: _admin("POST", "/v1/admin/reflect/ack", json={"seq": seq, "note": note}))
    if as_json:
        emit_json(data)
    else:
        out.print(f"acknowledged the T3 action at seq {data['acknowledged']} (event seq {data['event_seq']})")

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
    against: Annotated[Optional[str], typer.Option(help="A dated build (YYYY-MM-DD); default: the one before the latest.")] = None,
) -> None:
    """What changed between the latest capsule and an earlier dated build (unified diff)."""
    base = state.home.root / "capsules"
    latest = base / f"{name}_LATEST.md"
    history = sorted((base / f"{name}_CAPSULES").glob("*.md"))
    if not latest.exists():
        fail(CharterError("not_found", f"{latest} does not exist; run `charter capsule build {name}`"), common.REFUSED)
    if against:
        other = base / f"{name}_CAPSULES" / f"{against}.md"
    else:
        older = [h for h in history if h.read_bytes() != latest.read_bytes()]
        other = older[-1] if older else None
    if other is None or not other.exists():
        err.print("No earlier build to compare with.")
        return
    lines = difflib.unified_diff(other.read_text().splitlines(), latest.read_text().splitlines(),
                                 str(other), str(latest), lineterm="")
    for line in lines:
        print(line)


def reflect_command(as_json: JsonOpt = False) -> None:
    """Check every declared truth against the live system; exit 6 while a critical contradiction stands."""
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




"""`charter mcp`: Charter as an MCP server for an assistant, and the governing MCP proxy.

Both speak MCP on standard output, so nothing else may be printed there: errors go to stderr.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charter.cli import common
from charter.cli.common import fail
from charter.errors import CharterError

mcp_app = typer.Typer(
    help="MCP: `charter mcp --creds FILE` serves Charter's tools to an assistant over stdio; "
         "`charter mcp proxy` governs another MCP server's tools with the agent's policy. See docs/mcp.md.",
    invoke_without_command=True,
)

CredsOpt = Annotated[Optional[Path], typer.Option("--creds", help="The agent's credentials file (from `charter enroll`).")]


def _serve(body: Callable[[], Awaitable[Any]]) -> None:
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            asyncio.run(body())
        else:
            uvloop.run(body())
    except CharterError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@mcp_app.callback()
def mcp_serve(ctx: typer.Context, creds: CredsOpt = None) -> None:
    """Serve Charter's tools (publish, recent_events, capsule, act, budget, whoami, hand-offs) and resources
    (capsule, charter) to an assistant over stdio, acting as the agent in --creds."""
    if ctx.invoked_subcommand is not None:
        return
    if creds is None:
        fail(CharterError("bad_request", "give the agent's credentials: charter mcp --creds FILE"), common.USAGE)
    from charter.mcp.server import serve_stdio

    _serve(lambda: serve_stdio(str(creds)))


@mcp_app.command("proxy")
def mcp_proxy(
    command: Annotated[Optional[list[str]], typer.Argument(help="The downstream MCP server's command, after `--`.")] = None,
    creds: CredsOpt = None,
    url: Annotated[Optional[str], typer.Option("--url", help="A downstream MCP server over streamable HTTP instead of a command.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The server's name in action names mcp.NAME.TOOL (default: the name it reports).")] = None,
    header: Annotated[Optional[list[str]], typer.Option("--header", help="NAME: VALUE sent to an HTTP downstream (repeatable).")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="NAME=VALUE for the downstream process (repeatable).")] = None,
    pass_env: Annotated[Optional[list[str]], typer.Option("--pass-env", help="Pass this variable of ours to the downstream process (repeatable).")] = None,
    approval_wait: Annotated[float, typer.Option("--approval-wait", min=0, max=300, help="Seconds a call held for approval waits for the operator.")] = 300.0,
) -> None:
    """Expose a downstream MCP server's tools, each call decided by the agent's policy (allow, deny, or wait for approval).

    charter mcp proxy --creds alpha.creds.json --name fs -- npx -y @modelcontextprotocol/server-filesystem .
    """
    if creds is None:
        fail(CharterError("bad_request", "give the agent's credentials: charter mcp proxy --creds FILE -- COMMAND..."),
             common.USAGE)
    if bool(command) == bool(url):
        fail(CharterError("bad_request", "give the downstream server's command after `--`, or --url, not both"),
             common.USAGE)
    from charter.mcp.launch import parse_env
    from charter.mcp.proxy import run_proxy

    headers = {}
    for h in header or []:
        key, sep, value = h.partition(":")
        if not sep or not key.strip():
            fail(CharterError("bad_request", f"--header takes 'NAME: VALUE', not {h!r}"), common.USAGE)
        headers[key.strip()] = value.strip()
    try:
        set_env = parse_env(env or [])
    except CharterError as exc:
        fail(exc, common.USAGE)
    _serve(lambda: run_proxy(creds, list(command or []), url=url, name=name, headers=headers,
                             pass_env=list(pass_env or []), set_env=set_env, approval_wait=approval_wait))

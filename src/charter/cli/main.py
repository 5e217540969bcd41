"""`charter`: the operator's and the agents' command line.

Exit codes: 0 ok, 1 error, 2 usage, 3 no daemon or no home, 4 refused by the daemon,
5 verification found tampering.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from charter import __version__
from charter.cli import common
from charter.cli.common import emit_json, err, fail, ms_iso, out, run, state
from charter.cli.operator import OperatorClient
from charter.config import Home
from charter.errors import CharterError

app = typer.Typer(
    help="Charter: enrol agents, govern the bus they speak on, and see what they did.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
agents_app = typer.Typer(help="Enrolled agents: list, show, suspend, resume, revoke, renew, rotate keys.",
                         no_args_is_help=True)
invites_app = typer.Typer(help="Invite tokens: list and revoke.", no_args_is_help=True)
log_app = typer.Typer(help="The bus log: verify its hash chain.", no_args_is_help=True)
app.add_typer(agents_app, name="agents")
app.add_typer(invites_app, name="invites")
app.add_typer(log_app, name="log")

from charter.cli.governance import approvals_app, budget_app, policy_app  # noqa: E402

app.add_typer(policy_app, name="policy")
app.add_typer(approvals_app, name="approvals")
app.add_typer(budget_app, name="budget")

from charter.cli.models import models_app  # noqa: E402

app.add_typer(models_app, name="models")

from charter.cli.services import run_command, service_app, services_app  # noqa: E402

app.add_typer(services_app, name="services")
app.add_typer(service_app, name="service")
app.command("run")(run_command)

from charter.cli.archive import add_log_commands, archive_app  # noqa: E402

app.add_typer(archive_app, name="archive")
add_log_commands(log_app)  # `charter log query`: archived and live events together

from charter.cli.capsules import capsule_app, reflect_app  # noqa: E402

app.add_typer(capsule_app, name="capsule")

from charter.cli.nats import agents_nats_creds, migrate_command, nats_app  # noqa: E402

app.add_typer(nats_app, name="nats")
agents_app.command("nats-creds")(agents_nats_creds)
app.command("migrate")(migrate_command)

from charter.cli.mcp import mcp_app  # noqa: E402

app.add_typer(mcp_app, name="mcp")
app.add_typer(reflect_app, name="reflect")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
CredsOpt = Annotated[Path, typer.Option("--creds", help="The agent's credentials file (from `charter enroll`).")]


def _version(value: bool) -> None:
    if value:
        print(f"charter {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    home: Annotated[Optional[str], typer.Option("--home", help="CHARTER_HOME to use (default: $CHARTER_HOME or ~/.charter).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    state.home = Home.resolve(home)


# -- home and daemon ---------------------------------------------------------------------------


@app.command()
def init(as_json: JsonOpt = False) -> None:
    """Create CHARTER_HOME: config, root key (0600), database, default roles and policy. Safe to re-run."""
    from charter.identity.init import init_home

    report = init_home(state.home)
    if as_json:
        emit_json(report.__dict__)
        return
    out.print(f"Charter home: [bold]{report.home}[/bold]")
    for item in report.created:
        out.print(f"  [green]created[/green] {item}")
    for item in report.kept:
        out.print(f"  [dim]kept[/dim]    {item}")
    out.print(f"Root key id: [cyan]{report.root_key_id}[/cyan]")
    if report.created:
        out.print("Next: [bold]charter up[/bold], then [bold]charter invite --role worker[/bold].")


@app.command()
def up(
    port: Annotated[Optional[int], typer.Option(help="Port on 127.0.0.1 (default from charter.toml).")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background and return once it answers.")] = False,
) -> None:
    """Start the daemon on 127.0.0.1 (foreground unless --detach)."""
    from charter.server.daemon import read_daemon_file, serve, spawn

    home = state.home
    try:
        home.load_config()
    except CharterError as exc:
        fail(exc)
    if detach:
        running = read_daemon_file(home)
        if running:
            fail(CharterError("conflict", f"a daemon is already running (pid {running['pid']}) at {running['url']}"))
        try:
            info = spawn(home, port=port)
        except RuntimeError as exc:
            fail(str(exc))
        out.print(f"Charter is up at [bold]{info['url']}[/bold] (pid {info['pid']}); logs: {home.log_file}")
        from charter.server.daemon import dashboard_token

        token = dashboard_token(home)
        if token:
            out.print(f"Dashboard: {info['url']}/dashboard#token={token}")
        return
    raise SystemExit(serve(home, port=port))


@app.command()
def dashboard() -> None:
    """Print the dashboard's address with this start's login token."""
    from charter.server.daemon_file import dashboard_token, read_daemon_file

    info = read_daemon_file(state.home)
    token = dashboard_token(state.home)
    if not info or not token:
        fail(CharterError("not_running", "no daemon is running for this home; start it with `charter up`"),
             common.UNREACHABLE)
    print(f"{info['url']}/dashboard#token={token}")


@app.command()
def down() -> None:
    """Stop the background daemon."""
    from charter.server.daemon import stop

    if stop(state.home):
        out.print("Charter daemon stopped.")
    else:
        fail(CharterError("not_running", "no daemon is running for this home"), common.UNREACHABLE)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Report on the running daemon: version, log head, agents, counters."""

    async def body() -> dict[str, Any]:
        async with OperatorClient(state.home) as client:
            return await client.call("GET", "/v1/admin/status")

    info = run(body)
    if as_json:
        emit_json(info)
        return
    out.print(f"[bold green]up[/bold green] charter {info['version']} (pid {info['pid']}, up {info['uptime_s']}s)")
    out.print(f"home      {info['home']}")
    out.print(f"root key  {info['root_key_id']}")
    out.print(f"log       {info['log']['backend']}, head seq {info['log']['head_seq']}")
    out.print("agents    " + (", ".join(f"{n} {k}" for k, n in info["agents"].items()) or "none"))
    out.print("counters  " + ", ".join(f"{k}={v}" for k, v in info["counters"].items()))


# -- invites and enrolment ---------------------------------------------------------------------


@app.command()
def invite(
    role: Annotated[str, typer.Option(help="The role the new agent gets (see charter.toml [roles]).")],
    ttl: Annotated[Optional[str], typer.Option(help="How long the token is valid, e.g. 15m, 2h (default from config).")] = None,
    uses: Annotated[int, typer.Option(help="How many agents may enrol with it.", min=1, max=1000)] = 1,
    note: Annotated[str, typer.Option(help="A note kept with the invite (never the token).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an invite token for ROLE. The token is shown once and stored only as a hash."""

    async def body() -> dict[str, Any]:
        async with OperatorClient(state.home) as client:
            return await client.call("POST", "/v1/admin/invites", json={"role": role, "ttl": ttl, "uses": uses, "note": note})

    answer = run(body)
    if as_json:
        emit_json(answer)
        return
    inv = answer["invite"]
    err.print(f"Invite {inv['id']} for role [bold]{inv['role']}[/bold], {inv['uses']} use(s), expires {ms_iso(inv['expires_at'])}.")
    err.print("Give this token to the agent; it is not shown again:")
    print(answer["token"])


@invites_app.command("list")
def invites_list(as_json: JsonOpt = False) -> None:
    """Invites and their state: open, used, expired or revoked."""

    async def body() -> dict[str, Any]:
        async with OperatorClient(state.home) as client:
            return await client.call("GET", "/v1/admin/invites")

    rows = run(body)["invites"]
    if as_json:
        emit_json(rows)
        return
    table = Table("id", "role", "uses left", "state", "expires", "note")
    for r in rows:
        table.add_row(r["id"], r["role"], f"{r['uses_left']}/{r['uses']}", r["state"], ms_iso(r["expires_at"]), r["note"])
    out.print(table)


@invites_app.command("revoke")
def invites_revoke(invite_id: str) -> None:
    """Revoke an invite so that nobody can enrol with it."""

    async def body() -> Any:
        async with OperatorClient(state.home) as client:
            return await client.call("DELETE", f"/v1/admin/invites/{invite_id}")

    run(body)
    out.print(f"Invite {invite_id} revoked.")


@app.command()
def enroll(
    token: Annotated[str, typer.Option(help="The invite token from `charter invite`.")],
    name: Annotated[str, typer.Option(help="The agent's name: lowercase letters, digits and '-'.")],
    server: Annotated[Optional[str], typer.Option(help="The daemon's URL (default: this home's daemon).")] = None,
    creds: Annotated[Optional[Path], typer.Option("--creds", help="Where to write the credentials (default ./NAME.creds.json).")] = None,
    role: Annotated[Optional[str], typer.Option(help="Refuse unless the token is for this role.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Enrol an agent: make its key here, prove it, and save key and charter (mode 0600)."""
    from charter.sdk import Agent

    url = server
    if url is None:
        try:
            from charter.cli.operator import daemon_url

            url = daemon_url(state.home)
        except CharterError:
            url = "http://127.0.0.1:7477"
    path = creds or Path(f"{name}.creds.json")
    if path.exists():
        fail(CharterError("conflict", f"{path} already exists; choose another --creds path", str(path)))

    async def body() -> Any:
        agent = await Agent.enroll(url, token, name, path, role=role)
        await agent.close()
        return agent.creds.charter

    charter = run(body)
    if as_json:
        emit_json({"credentials": str(path), "charter": charter})
        return
    out.print(f"Enrolled [bold]{charter['name']}[/bold] as {charter['agent_id']} (role {charter['role']}).")
    out.print(f"Credentials: {path} (mode 0600; the private key never leaves this file)")
    out.print(f"May publish: {', '.join(charter['scopes']['publish']) or 'nothing'}")
    out.print(f"May subscribe: {', '.join(charter['scopes']['subscribe']) or 'nothing'}")
    out.print(f"Sandbox: {charter['sandbox']['path']}; charter expires {ms_iso(charter['expires_at'])}")


# -- agents ------------------------------------------------------------------------------------


@agents_app.command("list")
def agents_list(as_json: JsonOpt = False) -> None:
    """Every enrolled agent with its role and status."""

    async def body() -> dict[str, Any]:
        async with OperatorClient(state.home) as client:
            return await client.call("GET", "/v1/admin/agents")

    rows = run(body)["agents"]
    if as_json:
        emit_json(rows)
        return
    table = Table("name", "id", "role", "status", "key", "expires")
    colour = {"active": "green", "suspended": "yellow", "revoked": "red"}
    for a in rows:
        table.add_row(a["name"], a["id"], a["role"], f"[{colour[a['status']]}]{a['status']}[/]", a["key_id"], ms_iso(a["expires_at"]))
    out.print(table)


@agents_app.command("show")
def agents_show(agent: Annotated[str, typer.Argument(help="Agent name or id.")], as_json: JsonOpt = False) -> None:
    """One agent: its charter, scoped view, policy binding and sandbox."""

    async def body() -> dict[str, Any]:
        async with OperatorClient(state.home) as client:
            return await client.call("GET", f"/v1/admin/agents/{agent}")

    a = run(body)
    if as_json:
        emit_json(a)
        return
    out.print(f"[bold]{a['name']}[/bold] {a['id']}  role {a['role']}  status {a['status']}"
              + (f" ({a['reason']})" if a["reason"] else ""))
    out.print(f"key        {a['key_id']}")
    out.print(f"publish    {', '.join(a['scopes']['publish'])}")
    out.print(f"subscribe  {', '.join(a['scopes']['subscribe'])}")
    p = a["policy"]
    out.print(f"policy     {p['id']} v{p['version']} sha256:{p['hash'][:16]}…  max tier {a['max_tier']}")
    out.print(f"budget     {a['budget']}")
    out.print(f"sandbox    {a['sandbox']['path']} ({a['sandbox_used_bytes']} of {a['sandbox']['quota_bytes']} bytes)")
    out.print(f"charter    issued {ms_iso(a['issued_at'])}, expires {ms_iso(a['expires_at'])}")


def _agent_action(action: str, agent: str, reason: str, as_json: bool) -> None:
    async def body() -> dict[str, Any]:
        async with OperatorClient(state.home) as client:
            return await client.call("POST", f"/v1/admin/agents/{agent}/{action}", json={"reason": reason})

    a = run(body)
    if as_json:
        emit_json(a)
    else:
        out.print(f"{a['name']} ({a['id']}) is now [bold]{a['status']}[/bold].")


@agents_app.command("suspend")
def agents_suspend(agent: str, reason: Annotated[str, typer.Option(help="Why; kept on the record.")] = "",
                   as_json: JsonOpt = False) -> None:
    """Suspend an agent: its messages are refused (`suspended`) until it is resumed."""
    _agent_action("suspend", agent, reason, as_json)


@agents_app.command("resume")
def agents_resume(agent: str, reason: Annotated[str, typer.Option(help="Why; kept on the record.")] = "",
                  as_json: JsonOpt = False) -> None:
    """Resume a suspended agent."""
    _agent_action("resume", agent, reason, as_json)


@agents_app.command("revoke")
def agents_revoke(agent: str, reason: Annotated[str, typer.Option(help="Why; kept on the record.")] = "",
                  as_json: JsonOpt = False) -> None:
    """Revoke an agent for good: its very next message is refused (`revoked`)."""
    _agent_action("revoke", agent, reason, as_json)


@agents_app.command("renew")
def agents_renew(
    agent: Annotated[Optional[str], typer.Argument(help="As the operator: the agent's name or id (works after expiry too).")] = None,
    creds: Annotated[Optional[Path], typer.Option("--creds", help="As the agent: its credentials file (before expiry).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Renew a charter: as the agent with --creds, or as the operator by name (also after expiry)."""
    from charter.sdk import Agent

    if (agent is None) == (creds is None):
        fail(CharterError("bad_request", "give either an agent name (operator) or --creds (agent)"), common.USAGE)

    async def body() -> dict[str, Any]:
        if creds is not None:
            async with Agent.load(creds) as me:
                return await me.renew()
        async with OperatorClient(state.home) as client:
            await client.call("POST", f"/v1/admin/agents/{agent}/renew")
            return (await client.call("GET", f"/v1/admin/agents/{agent}"))["charter"]

    charter = run(body)
    if as_json:
        emit_json(charter)
    else:
        out.print(f"Charter renewed; expires {ms_iso(charter['expires_at'])}.")


@agents_app.command("api-key")
def agents_api_key(creds: CredsOpt, as_json: JsonOpt = False) -> None:
    """Issue a new bearer key for OpenAI/Ollama clients (the old one stops working); saved in the credentials."""
    from charter.sdk import Agent

    async def body() -> str:
        async with Agent.load(creds) as agent:
            return await agent.rotate_api_key()

    key = run(body)
    if as_json:
        emit_json({"credentials": str(creds), "rotated": True})
    else:
        out.print(f"New API key saved in {creds} (shown nowhere else). Use it as OPENAI_API_KEY with "
                  "base_url http://127.0.0.1:7477/v1, or as an Ollama client's Authorization header.")
    _ = key


@agents_app.command("rotate-key")
def agents_rotate_key(creds: CredsOpt, as_json: JsonOpt = False) -> None:
    """Replace an agent's key with a new one made here; the old key stops working at once."""
    from charter.sdk import Agent

    async def body() -> dict[str, Any]:
        async with Agent.load(creds) as agent:
            old = agent.creds.key.public.key_id
            charter = await agent.rotate_key()
            return {"old_key_id": old, "new_key_id": agent.creds.key.public.key_id, "charter": charter}

    answer = run(body)
    if as_json:
        emit_json(answer)
    else:
        out.print(f"Key rotated: {answer['old_key_id']} -> {answer['new_key_id']}; credentials updated.")


# -- the bus -----------------------------------------------------------------------------------


@app.command()
def publish(
    subject: Annotated[str, typer.Argument(help="Subject, e.g. agents.alpha.events")],
    payload: Annotated[str, typer.Argument(help="JSON payload, or - to read it from standard input.")],
    creds: CredsOpt,
    kind: Annotated[str, typer.Option(help="Envelope kind.")] = "event",
    as_json: JsonOpt = False,
) -> None:
    """Sign PAYLOAD with the agent's key and publish it to SUBJECT; prints the durable sequence number."""
    from charter.sdk import Agent

    text = sys.stdin.read() if payload == "-" else payload
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(CharterError("malformed", f"payload is not JSON: {exc}", "payload"), common.USAGE)

    async def body() -> dict[str, Any]:
        async with Agent.load(creds) as agent:
            return await agent.publish(subject, value, kind)

    receipt = run(body)
    if as_json:
        emit_json(receipt)
    else:
        out.print(f"accepted seq {receipt['seq']} id {receipt['id']} hash {receipt['hash'][:16]}…")


def _event_line(ev: dict[str, Any], names: dict[str, str]) -> str:
    env = ev["envelope"]
    who = names.get(env["sender"], env["sender"])
    payload = json.dumps(env["payload"], separators=(",", ":"))
    if len(payload) > 120:
        payload = payload[:117] + "..."
    return f"[dim]{ev['seq']:>6}[/dim] {ms_iso(env['ts'])} [cyan]{who:<12}[/cyan] [bold]{env['subject']}[/bold] {env['kind']} {common.escape(payload)}"


@app.command()
def tail(
    pattern: Annotated[str, typer.Argument(help="Subject pattern: `*` one token, `>` the rest.")] = ">",
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many recent events to show first.", min=0)] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events as they arrive.")] = False,
    creds: Annotated[Optional[Path], typer.Option("--creds", help="Tail as this agent (its scope applies) instead of the operator.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show recent events on the bus, and follow new ones with -f. One JSON object a line with --json."""
    from charter.sdk import Agent

    async def body() -> None:
        names: dict[str, str] = {}
        if creds:
            agent = Agent.load(creds)
            client = agent.http
        else:
            client = OperatorClient(state.home)
            try:
                names = {a["id"]: a["name"] for a in (await client.call("GET", "/v1/admin/agents"))["agents"]}
            except CharterError:
                await client.close()
                raise
        try:
            last = None
            if limit:
                events = (await client.call("GET", "/v1/events", params={"pattern": pattern, "limit": limit}))["events"]
                for ev in events:
                    _print_event(ev, names, as_json)
                    last = ev["seq"]
            if follow:
                params: dict[str, Any] = {"pattern": pattern}
                if last is not None:
                    params["from_seq"] = last + 1
                async for event, data in client.sse("/v1/subscribe", params):
                    if event == "error":
                        e = json.loads(data)
                        raise CharterError(e["code"], e["message"], e.get("where"))
                    if event == "envelope":
                        _print_event(json.loads(data), names, as_json)
        finally:
            await client.close()

    run(body)


def _print_event(ev: dict[str, Any], names: dict[str, str], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(ev, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    else:
        out.print(_event_line(ev, names), highlight=False)


@log_app.command("verify")
def log_verify(
    signatures: Annotated[bool, typer.Option("--signatures/--no-signatures", help="Also check every entry's signature against the keys the log itself records.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the log's hash chain (and signatures) from the database file; name the first bad sequence number."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from charter.bus.log.sqlite import verify_file

    home = state.home
    nats_bus = home.config_path.exists() and home.load_config().bus.backend == "nats"
    if not nats_bus and not home.db_path.exists():
        fail(CharterError("not_initialised", f"no database at {home.db_path}; run `charter init`"), common.UNREACHABLE)
    root = None
    if signatures:
        from charter.identity.keys import SigningKey

        root = SigningKey.load_pem(home.root_key_path).public

    def check(progress: Any = None) -> Any:
        if nats_bus:  # the log is a JetStream stream (docs/nats.md): read it back from the server
            import asyncio

            from charter.bus.log.backends import open_log

            async def remote() -> Any:
                log = open_log(home.load_config().bus, home.db_path)
                try:
                    return await log.verify(progress, root=root)
                finally:
                    await log.close()

            return asyncio.run(remote())
        return verify_file(home.db_path, progress, root=root)

    if as_json:
        report = check()
    else:
        with Progress(TextColumn("verifying the log"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("verify", total=None)
            report = check(lambda done, total: bar.update(task, completed=done, total=total))
    result = {
        "ok": report.ok, "checked": report.checked, "head_seq": report.head_seq, "head_hash": report.head_hash,
        "first_bad_seq": report.first_bad, "breaks": [{"seq": b.seq, "reason": b.reason} for b in report.breaks],
        "horizon_seq": report.horizon_seq,  # entries up to here were archived and pruned (docs/archive.md)
    }
    if as_json:
        emit_json(result)
    elif report.ok:
        what = "chain and signatures" if root else "chain"
        out.print(f"[green]ok[/green] {report.checked} entries ({what}); head seq {report.head_seq} hash {report.head_hash[:16]}…"
                  + (f"; entries up to {report.horizon_seq} are in the archive" if report.horizon_seq else ""))
    else:
        err.print(f"[bold red]chain broken[/bold red] at seq {report.first_bad}: {report.breaks[0].reason}")
        for b in report.breaks[1:6]:
            err.print(f"  also seq {b.seq}: {b.reason}")
    if not report.ok:
        raise SystemExit(common.VERIFY_FAILED)


def main() -> None:
    try:
        app()
    except CharterError as exc:
        fail(exc)

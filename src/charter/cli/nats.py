"""`charter nats setup` (operator) and `charter agents nats-creds` (agent): docs/nats.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charter.cli.common import emit_json, out, run, state

nats_app = typer.Typer(help="Charter as the NATS operator: keys, JWTs, a server configuration.",
                       no_args_is_help=True)


@nats_app.command("setup")
def nats_setup(
    listen: Annotated[str, typer.Option(help="host:port the nats-server listens on.")] = "127.0.0.1:4222",
    store_dir: Annotated[Optional[Path], typer.Option(help="JetStream's store directory.")] = None,
    resolver_dir: Annotated[Optional[Path], typer.Option(help="The full resolver's directory (account JWTs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")] = False,
) -> None:
    """Make the operator and account keys (kept if they exist) and write nats/server.conf and creds."""
    from charter.bus.nats_auth import NatsAuthority
    from charter.bus.nats_bridge import nats_dir

    home = state.home
    directory = nats_dir(home.root)
    auth = NatsAuthority.create(directory)
    files = auth.write_files(listen=listen, store_dir=store_dir or directory / "jetstream",
                             resolver_dir=resolver_dir or directory / "resolver")
    doc: dict[str, Any] = {"operator": auth.operator, "account": auth.account, "system_account": auth.system_account,
                           "files": {k: str(v) for k, v in files.items()}}
    if as_json:
        emit_json(doc)
        return
    out.print(f"NATS operator {auth.operator[:12]}…, account {auth.account[:12]}… in {directory}")
    out.print(f"Start the server:  nats-server -c {files['server.conf']}")
    out.print("Then in charter.toml:\n  [bus]\n  backend = \"nats\"          # optional: the log on JetStream too\n"
              f"  nats_url = \"nats://{listen}\"\n  nats_creds = \"nats/charter.creds\"\n  nats_agents = true")


def agents_nats_creds(
    creds: Annotated[Path, typer.Option("--creds", help="The agent's credentials file (from `charter enroll`).")],
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Where to write the .creds file "
                                                     "(default NAME.nats.creds beside --creds).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")] = False,
) -> None:
    """As the agent: fetch its NATS user JWT and write a .creds file signed by its own key (mode 0600)."""
    from charter.sdk import Agent
    from charter.sdk.nats import write_nats_creds

    async def body() -> tuple[Path, dict[str, Any]]:
        async with Agent.load(creds) as agent:
            target = out_path or creds.with_name(f"{agent.name}.nats.creds")
            return target, await write_nats_creds(agent, target)

    target, answer = run(body)
    doc = {"creds": str(target), "user": answer["user"], "servers": answer["servers"],
           "publish": f"{answer['publish_prefix']}.<subject>", "subscribe": f"{answer['deliver_prefix']}.<pattern>",
           "inbox_prefix": answer["inbox_prefix"], "expires_at": answer["expires_at"]}
    if as_json:
        emit_json(doc)
    else:
        out.print(f"NATS credentials in {target}; servers {', '.join(answer['servers'])}. Publish signed envelopes "
                  f"on in.<subject>, receive on ev.<pattern>, with inbox prefix {answer['inbox_prefix']}.")


def migrate_command(
    log: Annotated[bool, typer.Option("--log/--no-log", help="Copy the bus log to NATS (bus.backend = nats).")] = True,
    store: Annotated[bool, typer.Option("--store/--no-store", help="Copy the registry (agents, invites, bearer keys) "
                                        "and the budget ledger to PostgreSQL (store.backend = postgres).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")] = False,
) -> None:
    """Move the log onto NATS, the registry and the budget ledger onto PostgreSQL, as charter.toml says; verify after."""
    from charter.cli.common import err, fail
    from charter.errors import CharterError
    from charter.migrate import migrate_log, migrate_store
    from charter.server.daemon_file import read_daemon_file

    home = state.home
    if read_daemon_file(home):
        fail(CharterError("conflict", "the daemon is running; stop it (charter down) before migrating"))
    config = home.load_config()
    say = (lambda _: None) if as_json else (lambda m: err.print(m))
    doc: dict[str, Any] = {}
    if log and config.bus.backend == "nats":
        doc["log"] = run(lambda: migrate_log(home, say))
    if store and config.store.backend == "postgres":
        try:
            doc["store"] = migrate_store(home, say)
        except CharterError as exc:
            fail(exc)
    if not doc:
        fail(CharterError("conflict", 'nothing to migrate: charter.toml has neither [bus] backend = "nats" nor '
                          '[store] backend = "postgres"'))
    ok = all(part.get("ok") for part in doc.values())
    if as_json:
        emit_json({"ok": ok, **doc})
    else:
        if "log" in doc:
            lg = doc["log"]
            out.print(f"log: {lg['copied']} entries copied ({lg['already_there']} were there), head seq "
                      f"{lg['head_seq']} {'matches' if lg['ok'] else 'DOES NOT match'} charter.db; "
                      f"{lg['consumers']} consumers")
        if "store" in doc:
            tables = ", ".join(f"{t} {n}" for t, n in doc["store"]["tables"].items())
            out.print(f"store: rows copied to PostgreSQL: {tables}")
    if not ok:
        raise SystemExit(5)

"""`charter archive ...` and `charter log query`.

Reading commands (verify, prove, consistency, check-proof, export, log query) work on the files
alone, with or without a daemon: a verifier must not have to trust the process it checks.
Writing commands (seal, checkpoint, sync, prune) ask the running daemon, so that its archivist
stays the one writer and the events carry its request ids; with no daemon they run here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charter.cli import common
from charter.cli.common import emit_json, err, fail, ms_iso, out, state
from charter.errors import CharterError

archive_app = typer.Typer(
    help="The archive: sealed segments, signed checkpoints, proofs, mirrors, retention.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
RootKeyOpt = Annotated[Optional[str], typer.Option(
    "--root-key", help="Pin the operator's root public key (base64url). Default: this home's root key, if any.")]


def _archive_dir() -> Path:
    return state.home.root / "archive"


def _home_root_key() -> Any:
    from charter.identity.keys import SigningKey

    try:
        return SigningKey.load_pem(state.home.root_key_path).public
    except (OSError, ValueError):
        return None


def _pinned(root_key: str | None) -> Any:
    from charter.identity.keys import PublicKey

    if root_key:
        try:
            return PublicKey.from_b64(root_key)
        except ValueError:
            fail(CharterError("bad_request", "--root-key is not a base64url Ed25519 public key", "root-key"), common.USAGE)
    return _home_root_key()


def _live_db() -> Path | None:
    """charter.db, when it holds the live log (not with `[bus] backend = "nats"`: `charter log verify` reads that)."""
    try:
        if state.home.load_config().bus.backend != "sqlite":
            err.print("[dim]note: the live log is a JetStream stream: checking the archive alone "
                      "(`charter log verify` checks the stream)[/dim]")
            return None
    except CharterError:
        pass
    return state.home.db_path


def _daemon_running() -> bool:
    from charter.server.daemon_file import read_daemon_file

    return read_daemon_file(state.home) is not None


def _write(path: str, body: dict[str, Any] | None = None) -> Any:
    """POST to the daemon's archive route if a daemon runs; None if none does (then run locally)."""
    if not _daemon_running():
        return None
    import aiohttp

    from charter.cli.operator import OperatorClient

    async def call() -> Any:
        async with OperatorClient(state.home) as client:
            client._timeout = aiohttp.ClientTimeout(total=3600, sock_connect=5)  # a first seal can be long
            return await client.call("POST", path, json=body or {})

    try:
        return asyncio.run(call())
    except CharterError as exc:  # the archivist refused (e.g. a broken live chain): exit 1, as without a daemon
        fail(exc, common.ERROR if exc.code == "conflict" else None)


def _local(work: Any) -> Any:
    from charter.archive.archivist import Archivist
    from charter.archive.layout import ArchiveError

    if not state.home.exists():
        fail(CharterError("not_initialised", f"{state.home.root} is not a Charter home; run `charter init`"))

    async def body() -> Any:
        archivist = Archivist.local(state.home)
        try:
            return await work(archivist)
        finally:
            await archivist.close()

    try:
        return asyncio.run(body())
    except ArchiveError as exc:
        fail(CharterError("conflict", str(exc), "archive"), common.ERROR)
    except CharterError as exc:
        fail(exc)


# -- writing -----------------------------------------------------------------------------------


@archive_app.command("seal")
def seal(as_json: JsonOpt = False) -> None:
    """Seal every entry that waits into segments now, and sign a checkpoint."""
    result = _write("/v1/admin/archive/seal")
    if result is None:
        result = _local(lambda a: a.seal(partial=True))
    if as_json:
        emit_json(result)
        return
    for s in result["sealed"]:
        ratio = s["raw_bytes"] / max(s["bytes"], 1)
        out.print(f"sealed segment {s['segment']:06d}: seq {s['first_seq']}..{s['last_seq']} ({s['count']} entries, "
                  f"{s['bytes']:,} bytes, {ratio:.1f}x) root {s['root'][:16]}…")
    if not result["sealed"]:
        out.print("nothing waited to be sealed")
    c = result.get("checkpoint")
    if c:
        out.print(f"checkpoint {c['number']}: {c['tree_size']} entries archived, root {c['root'][:16]}…, "
                  f"live head seq {c['head']['seq']}; signed by archivist {c['key_id']}")


@archive_app.command("checkpoint")
def checkpoint(as_json: JsonOpt = False) -> None:
    """Sign a checkpoint of the live head now (a later truncation of the log then shows)."""
    result = _write("/v1/admin/archive/checkpoint")
    if result is None:
        result = _local(lambda a: a.checkpoint())
        result = {"checkpoint": result}
    c = result["checkpoint"]
    if as_json:
        emit_json(c)
    else:
        out.print(f"checkpoint {c['number']}: tree size {c['tree_size']}, live head seq {c['head']['seq']}, "
                  f"root {c['root'][:16]}…")


@archive_app.command("sync")
def sync(
    to: Annotated[Optional[list[Path]], typer.Option("--to", help="Sync to this directory instead of the configured mirrors (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the archive to its mirrors (incremental, resumable), then verify each copy on its own."""
    if to:
        from charter.archive.sync import sync_mirror

        root = _home_root_key()
        results = [sync_mirror(_archive_dir(), p.expanduser().absolute(), root=root).to_dict() for p in to]
    else:
        answer = _write("/v1/admin/archive/sync")
        results = answer["mirrors"] if answer is not None else _local(lambda a: a.sync())
        if not results:
            fail(CharterError("bad_request", "no mirrors: set [archive] mirrors in charter.toml, or pass --to DIR"),
                 common.USAGE)
    if as_json:
        emit_json({"mirrors": results})
    else:
        for r in results:
            mark = "[green]ok[/green]" if r["ok"] else "[bold red]failed[/bold red]"
            out.print(f"{mark} {r['mirror']}: {len(r['copied'])} file(s) copied ({r['copied_bytes']:,} bytes"
                      + (f", resumed after {r['resumed_bytes']:,}" if r["resumed_bytes"] else "")
                      + f"), {r['skipped']} already there; "
                      + ("verified" if r["verified"] else f"verification failed at seq {r['first_bad_seq']}"
                         if r["verified"] is False else "not verified"))
            for c in r["conflicts"]:
                err.print(f"  [yellow]conflict[/yellow] {common.escape(c)}")
            if r["error"]:
                err.print(f"  [red]error[/red] {common.escape(r['error'])}")
    if any(r["verified"] is False for r in results):
        raise SystemExit(common.VERIFY_FAILED)
    if not all(r["ok"] for r in results):
        raise SystemExit(common.ERROR)


@archive_app.command("prune")
def prune_cmd(as_json: JsonOpt = False) -> None:
    """Remove entries older than hot_retention (charter.toml) from charter.db, once archived and mirrored."""
    result = _write("/v1/admin/archive/prune")
    if result is None:
        result = _local(lambda a: a.prune())
    if as_json:
        emit_json(result)
    elif result["pruned"]:
        out.print(f"removed {result['pruned']} archived entries from charter.db; it now starts after seq "
                  f"{result['horizon_seq']}")
    else:
        out.print("nothing removed" + (f": {result['reason']}" if result.get("reason") else ""))


@archive_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """What is archived, checkpointed and mirrored."""
    from charter.archive import checkpoints as cp
    from charter.archive.layout import Layout, load_state
    from charter.archive.retention import horizon_of
    from charter.archive.segments import archive_head

    layout = Layout(_archive_dir())
    try:
        archived, head_hash, _f, segments = archive_head(layout)
        latest = cp.latest(layout)
    except ValueError as exc:
        fail(CharterError("unreadable", f"{exc}; run `charter archive verify`"), common.ERROR)
    info = {
        "archive": str(layout.root), "archived_seq": archived, "archived_hash": head_hash.hex() if archived else "",
        "segments": segments, "checkpoint": latest, "horizon_seq": horizon_of(state.home.db_path),
        "mirrors": load_state(layout).get("mirrors", {}),
    }
    if as_json:
        emit_json(info)
        return
    out.print(f"archive     {layout.root}")
    out.print(f"archived    seq 1..{archived} in {segments} segment(s)")
    if latest:
        out.print(f"checkpoint  {latest['number']} at {ms_iso(latest['ts'])}: tree size {latest['tree_size']}, "
                  f"live head {latest['head']['seq']}, archivist {latest['key_id']}")
    out.print("charter.db  " + (f"starts after seq {info['horizon_seq']} (older entries pruned)"
                                  if info["horizon_seq"] else "holds every entry"))
    for path, m in info["mirrors"].items():
        mark = "[green]ok[/green]" if m.get("ok") else "[red]failed[/red]"
        out.print(f"mirror      {mark} {path}: {m.get('synced_seq', 0)} entries verified, last sync {ms_iso(int((m.get('at') or 0) * 1000))}")


# -- reading and checking ----------------------------------------------------------------------


@archive_app.command("verify")
def verify(
    path: Annotated[Optional[Path], typer.Option("--path", help="Verify this archive directory (a mirror) on its own.")] = None,
    db: Annotated[Optional[Path], typer.Option("--db", help="The live database to check with it (default: this home's, unless --path).")] = None,
    no_db: Annotated[bool, typer.Option("--no-db", help="Check the archive alone, not the live database.")] = False,
    root_key: RootKeyOpt = None,
    signatures: Annotated[bool, typer.Option("--signatures", help="Also check every entry's signature against the keys the log records.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recompute everything: entries, chain, segments, Merkle roots, checkpoints. Exit 5 names the first bad seq."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from charter.archive.layout import Layout
    from charter.archive.verify import verify_archive

    target = path.expanduser().absolute() if path else _archive_dir()
    if path is not None and not target.is_dir():
        fail(CharterError("not_found", f"no archive at {target}"), common.ERROR)
    db_path = None if no_db else (db or (None if path else _live_db()))
    root = _pinned(root_key)
    with Layout(target).reading():  # a live daemon's seals and prunes wait: the check reads one state
        if as_json:
            report = verify_archive(target, db_path=db_path, root=root, signatures=signatures)
        else:
            with Progress(TextColumn("verifying the archive"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=err, transient=True) as bar:
                task = bar.add_task("verify", total=None)
                report = verify_archive(target, db_path=db_path, root=root, signatures=signatures,
                                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        emit_json(report.to_dict())
    elif report.ok:
        live = f", live log checked ({report.live_checked} entries)" if db_path else ""
        out.print(f"[green]ok[/green] {report.archived} archived entries in {report.segments} segment(s), "
                  f"{report.checkpoints} checkpoint(s){live}; head seq {report.head_seq}"
                  + (f" {report.head_hash[:16]}…" if report.head_hash else ""))
        out.print(f"[dim]trust: {common.escape(report.trust)}[/dim]")
        for n in report.notes:
            out.print(f"[dim]note: {common.escape(n)}[/dim]")
    else:
        first = report.sorted_breaks()[0]
        err.print(f"[bold red]tampering found[/bold red]: first bad seq {report.first_bad}: {common.escape(first.reason)}")
        for b in report.sorted_breaks()[1:8]:
            err.print(f"  also seq {b.seq if b.seq is not None else '-'} ({b.kind}): {common.escape(b.reason)}")
        err.print(f"[dim]trust: {common.escape(report.trust)}[/dim]")
    if not report.ok:
        raise SystemExit(common.VERIFY_FAILED)


def _emit_doc(doc: dict[str, Any], out_path: Path | None) -> None:
    text = json.dumps(doc, indent=2) + "\n"
    if out_path is None:
        sys.stdout.write(text)
    else:
        from charter.fsutil import write_private

        write_private(out_path, text.encode(), mode=0o644)
        err.print(f"wrote {out_path}")


@archive_app.command("prove")
def prove(
    seq: Annotated[int, typer.Argument(help="The entry's sequence number.", min=1)],
    checkpoint_number: Annotated[Optional[int], typer.Option("--checkpoint", help="Prove against this checkpoint (default: the latest).")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write the proof here instead of printing it.")] = None,
) -> None:
    """Print an inclusion proof for entry SEQ (JSON) that `charter archive check-proof` verifies offline."""
    from charter.archive.layout import ArchiveError, Layout
    from charter.archive.proofs import inclusion_proof

    try:
        doc = inclusion_proof(Layout(_archive_dir()), seq, checkpoint_number)
    except (ArchiveError, ValueError) as exc:
        fail(CharterError("not_found", str(exc), "seq"), common.ERROR)
    _emit_doc(doc, out_path)


@archive_app.command("consistency")
def consistency(
    first: Annotated[int, typer.Argument(help="The older checkpoint's number.", min=1)],
    second: Annotated[int, typer.Argument(help="The newer checkpoint's number.", min=1)],
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write the proof here instead of printing it.")] = None,
) -> None:
    """Print a consistency proof: checkpoint SECOND's tree extends checkpoint FIRST's (RFC 6962)."""
    from charter.archive.layout import ArchiveError, Layout
    from charter.archive.proofs import consistency_proof

    try:
        doc = consistency_proof(Layout(_archive_dir()), first, second)
    except (ArchiveError, ValueError) as exc:
        fail(CharterError("not_found", str(exc)), common.ERROR)
    _emit_doc(doc, out_path)


@archive_app.command("check-proof")
def check_proof_cmd(
    file: Annotated[Path, typer.Argument(help="A proof from `prove` or `consistency` ('-' reads standard input).")],
    root_key: Annotated[Optional[str], typer.Option("--root-key", help="Pin the operator's root public key (base64url).")] = None,
    archivist_key: Annotated[Optional[str], typer.Option("--archivist-key", help="Pin the archivist's public key instead.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a proof offline: no database, no archive, no daemon. Exit 5 if it does not hold."""
    from charter.archive.proofs import check_proof
    from charter.identity.keys import PublicKey

    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        proof = json.loads(text)
    except (OSError, ValueError) as exc:
        fail(CharterError("malformed", f"cannot read the proof: {exc}"), common.USAGE)
    pins = {}
    for name, value in (("root", root_key), ("archivist", archivist_key)):
        if value:
            try:
                pins[name] = PublicKey.from_b64(value)
            except ValueError:
                fail(CharterError("bad_request", f"--{name}-key is not a base64url Ed25519 public key"), common.USAGE)
    result = check_proof(proof, **pins)
    if as_json:
        emit_json(result.to_dict())
    elif result.ok:
        what = f"entry {result.seq} is in" if result.seq else "the tree extends the older one in"
        out.print(f"[green]ok[/green] {what} checkpoint {result.checkpoint} (tree size {result.tree_size})")
        out.print(f"[dim]trust: {common.escape(result.trust)}[/dim]")
    else:
        for p in result.problems:
            err.print(f"[bold red]proof fails[/bold red]: {common.escape(p)}")
    if not result.ok:
        raise SystemExit(common.VERIFY_FAILED)


@archive_app.command("export")
def export(
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON object a line: {seq, hash, prev, source, envelope}.")] = False,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of standard output.")] = None,
    from_seq: Annotated[int, typer.Option("--from-seq", help="First sequence number.", min=1)] = 1,
    to_seq: Annotated[Optional[int], typer.Option("--to-seq", help="Last sequence number.")] = None,
    archived_only: Annotated[bool, typer.Option("--archived-only", help="Only what is sealed in the archive.")] = False,
) -> None:
    """Export archived and live events in sequence order (canonical JSON of `envelope` is the hashed raw)."""
    from charter.archive.query import Query, events

    if not jsonl:
        fail(CharterError("bad_request", "choose a format: --jsonl"), common.USAGE)
    q = Query(after_seq=from_seq - 1, until_seq=to_seq)
    db = None if archived_only else state.home.db_path
    sink = open(out_path, "w", encoding="utf-8") if out_path else sys.stdout  # noqa: SIM115
    n = 0
    try:
        for ev in events(_archive_dir(), db, q, _bus()):
            sink.write(json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n")
            n += 1
    except ValueError as exc:  # a segment that cannot be read
        fail(CharterError("unreadable", f"{exc}; run `charter archive verify`"), common.ERROR)
    finally:
        if out_path:
            sink.close()
    if out_path:
        err.print(f"exported {n} events to {out_path}")


# -- charter log query -------------------------------------------------------------------------

_REL = re.compile(r"\d+(?:\.\d+)?(?:ms|s|m|h|d|w)(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))*")


def parse_when(text: str, what: str) -> int:
    """Milliseconds since the epoch from ISO-8601 (`2026-01-31`, `2026-01-31T10:00Z`), a duration ago
    (`2h`, `30m`, `7d`), or an integer of milliseconds."""
    s = text.strip()
    if s.isdigit():
        return int(s)
    if _REL.fullmatch(s):
        from charter.units import parse_duration

        return int((time.time() - parse_duration(s)) * 1000)
    try:
        when = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        fail(CharterError("bad_request", f"--{what} {text!r}: use ISO-8601 (2026-01-31T10:00Z), a duration ago (2h) "
                                         "or milliseconds", what), common.USAGE)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _bus() -> Any:
    """The configured bus, so that live events come from the log in use (charter.db or NATS)."""
    if not state.home.config_path.exists():
        return None
    try:
        return state.home.load_config().bus
    except CharterError as exc:
        fail(exc, common.USAGE)


def _names(db_path: Path) -> dict[str, str]:
    import sqlite3

    from charter.db import connect

    if not db_path.exists():
        return {}
    db = connect(db_path, readonly=True)
    try:
        return dict(db.execute("SELECT id, name FROM agents").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def log_query(
    subject: Annotated[Optional[str], typer.Option("--subject", "-s", help="Subject pattern: `*` one token, `>` the rest.")] = None,
    sender: Annotated[Optional[str], typer.Option("--sender", help="Agent name or id, or `operator`.")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="From: ISO-8601, a duration ago (2h), or ms.")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Before: ISO-8601, a duration ago, or ms.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", "-t", help="Case-insensitive text anywhere in the envelope.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many (the most recent); 0 for all.", min=0)] = 100,
    first: Annotated[bool, typer.Option("--first", help="Keep the oldest matches instead of the most recent.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Search archived and live events together, in sequence order. One JSON object a line with --json."""
    from charter.archive.query import Query, events, resolve_sender
    from charter.bus.subjects import SubjectError, validate_pattern

    db_path = state.home.db_path
    if subject:
        try:
            validate_pattern(subject)
        except SubjectError as exc:
            fail(CharterError("bad_request", str(exc), "subject"), common.USAGE)
    q = Query(subject=subject, sender=resolve_sender(db_path, sender) if sender else None,
              since_ms=parse_when(since, "since") if since else None,
              until_ms=parse_when(until, "until") if until else None, text=text)
    found = events(_archive_dir(), db_path, q, _bus())
    try:
        if limit and first:
            rows: Any = [ev for _, ev in zip(range(limit), found, strict=False)]
        else:
            rows = deque(found, maxlen=limit or None)
    except ValueError as exc:  # a segment that cannot be read
        fail(CharterError("unreadable", f"{exc}; run `charter archive verify`"), common.ERROR)
    names = {} if as_json else _names(db_path)
    for ev in rows:
        if as_json:
            sys.stdout.write(json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n")
            continue
        env = ev["envelope"]
        who = names.get(env.get("sender", ""), env.get("sender", ""))
        payload = json.dumps(env.get("payload"), separators=(",", ":"))
        if len(payload) > 110:
            payload = payload[:107] + "..."
        mark = "[dim]a[/dim]" if ev["source"] == "archive" else " "
        out.print(f"{mark}[dim]{ev['seq']:>7}[/dim] {ms_iso(env.get('ts'))} [cyan]{who:<12}[/cyan] "
                  f"[bold]{env.get('subject')}[/bold] {env.get('kind')} {common.escape(payload)}", highlight=False)
    if not as_json and not rows:
        err.print("no matching events")


def add_log_commands(log_app: typer.Typer) -> None:
    """`charter log query` next to `charter log verify`."""
    log_app.command("query")(log_query)

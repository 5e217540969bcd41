"""`charter migrate`: move a SQLite installation's log onto NATS JetStream, and its registry (agents,
invites, bearer keys) and budget ledger onto PostgreSQL, as `[bus] backend` and `[store] backend` in
charter.toml now say, then verify.

The daemon must be stopped. The log is copied entry by entry, in order, in batches that fit one
JetStream message; the NATS log recomputes every hash, and each receipt must equal the SQLite
entry's (same seq, same hash) or the migration stops. A stream that already holds a prefix of
this log is continued (a migration cut short can be run again); one that holds anything else is
refused. Named consumers follow. Then the whole stream is verified, signatures included, and its
head must equal the SQLite head. The registry's tables (charter.db) and the ledger's (budget.db) are
copied in one PostgreSQL transaction, into empty tables only, and their counts and totals compared.
Both files are left as they were (a home from before budget.db has its ledger moved there first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from charter.budget.ledger import COLUMN_DEFAULTS
from charter.budget.ledger import KEYS as LEDGER_KEYS
from charter.budget.ledger import TABLES as LEDGER_TABLES
from charter.bus.envelope import parse
from charter.config import Home
from charter.errors import CONFLICT, CharterError

STORE_TABLES = {  # charter.db's registry, then budget.db's ledger (PostgreSQL numbers the spend rows itself)
    "invites": "id, token_hash, role, uses, uses_left, created_at, expires_at, revoked, note",
    "agents": "id, name, role, public_key, status, reason, charter, issued_at, expires_at, invite_id, created_at, "
              "updated_at",
    "api_keys": "key_hash, agent_id, created_at, revoked",
    **{t: c.removeprefix("id, ") if t == "spend" else c for t, c in LEDGER_TABLES.items()},
}


async def migrate_log(home: Home, say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from charter.bus.log.backends import open_log
    from charter.bus.log.sqlite import SqliteLog, read_horizon
    from charter.identity.keys import SigningKey

    config = home.load_config()
    if config.bus.backend != "nats":
        raise CharterError(CONFLICT, 'set [bus] backend = "nats" (and nats_url, stream) first', "bus.backend")
    source = SqliteLog(home.db_path)
    target = open_log(config.bus, home.db_path)
    try:
        if read_horizon(source._db) is not None:  # noqa: SLF001 - the file is ours
            raise CharterError(CONFLICT, "older entries of this log were archived and removed from charter.db "
                               "(retention); a stream must start at seq 1", "log")
        src_seq, src_head = source.head_sync()
        have, have_hash = await target.head()
        if have > src_seq or (have and (e := await source.get(have)) is not None and e.hash != have_hash):
            raise CharterError(CONFLICT, f"stream {config.bus.stream!r} already holds a log that is not this one "
                               f"(its seq {have} differs); use another [bus] stream", "bus.stream")
        say(f"copying entries {have + 1}..{src_seq} to stream {config.bus.stream}")
        copied, budget = 0, int(target._max_payload * 0.9)  # noqa: SLF001 - one message per batch
        cursor = have
        while cursor < src_seq:
            entries, size = [], 0
            for e in source.read_sync(cursor, 2000):
                if entries and size + len(e.raw) + 64 > budget:
                    break
                entries.append(e)
                size += len(e.raw) + 64
            receipts = await target.append([parse(e.raw, max_bytes=2**31) for e in entries])
            for e, r in zip(entries, receipts, strict=True):
                if (r.seq, r.hash) != (e.seq, e.hash.hex()):
                    raise CharterError("migrate_failed", f"entry {e.seq} landed as seq {r.seq} hash {r.hash[:16]}…, "
                                       f"not {e.hash.hex()[:16]}…; stopped", "log")
            cursor = entries[-1].seq
            copied += len(entries)
            say(f"  {cursor}/{src_seq}")
        consumers = 0
        for owner, name, pattern, acked in source._db.execute(  # noqa: SLF001
                "SELECT owner, name, pattern, acked_seq FROM consumers").fetchall():
            from charter.bus.log.base import ConsumerState

            have_c = await target.consumer(owner, name)
            if have_c is None:
                await target.put_consumer(ConsumerState(owner, name, pattern, acked))
            else:
                await target.ack(owner, name, acked)
            consumers += 1
        say("verifying the stream (chain and signatures)")
        root = SigningKey.load_pem(home.root_key_path).public
        report = await target.verify(root=root)
        head = await target.head()
        ok = report.ok and head == (src_seq, src_head)
        return {"ok": ok, "copied": copied, "already_there": have, "head_seq": head[0], "head_hash": head[1].hex(),
                "sqlite_head_hash": src_head.hex(), "consumers": consumers,
                "breaks": [{"seq": b.seq, "reason": b.reason} for b in report.breaks]}
    finally:
        source.close_sync()
        await target.close()


def migrate_store(home: Home, say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    import psycopg

    from charter.budget.pg import PgLedger
    from charter.budget.ledger import Ledger
    from charter.budget.relocate import move_ledger
    from charter.db import connect, select_list
    from charter.identity.registry_pg import PgRegistry

    config = home.load_config()
    if config.store.backend != "postgres":
        raise CharterError(CONFLICT, 'set [store] backend = "postgres" (and postgres_dsn) first', "store.backend")
    PgLedger(config.store.postgres_dsn).close()  # the tables
    PgRegistry(config.store.postgres_dsn, listen=False).close()
    moved = move_ledger(home.db_path, home.budget_db_path)  # a home from before budget.db: its ledger first
    if moved:
        say(f"  the ledger moved from {home.db_path.name} to {home.budget_db_path.name} first ({moved} rows)")
    Ledger(home.budget_db_path, background_checkpoints=False).close()  # a home that never had a ledger
    registry = connect(home.db_path, readonly=True)
    ledger = connect(home.budget_db_path, readonly=True)
    out: dict[str, Any] = {"tables": {}}
    try:
        with psycopg.connect(config.store.postgres_dsn) as pg, pg.transaction():
            for table, cols in STORE_TABLES.items():
                src = ledger if table in LEDGER_TABLES else registry
                if pg.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]:
                    raise CharterError(CONFLICT, f"PostgreSQL table {table} is not empty; it was migrated "
                                       "already or belongs to another installation", "store.postgres_dsn")
                order = LEDGER_KEYS.get(table, "rowid")
                rows = src.execute(f"SELECT {select_list(src, table, cols, COLUMN_DEFAULTS)} FROM {table} "
                                   f"ORDER BY {order}").fetchall()
                if rows:
                    with pg.cursor() as cur:
                        marks = ",".join(["%s"] * len(cols.split(",")))
                        cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)
                say(f"  {table}: {len(rows)} rows")
                out["tables"][table] = len(rows)
            checks = {
                "agents": (registry, "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'active') FROM agents"),
                "usage": (ledger, "SELECT COALESCE(SUM(reserved), 0), COALESCE(SUM(committed), 0) FROM budget_usage"),
                "spend": (ledger, "SELECT COALESCE(SUM(usd), 0), COUNT(*) FROM spend"),
            }
            for what, (src, sql) in checks.items():
                a, b = tuple(src.execute(sql).fetchone()), tuple(int(x) for x in pg.execute(sql).fetchone())
                if a != b:
                    raise CharterError("migrate_failed", f"{what} totals differ after the copy: {a} vs {b}", "ledger")
                out[what] = list(b)
    finally:
        registry.close()
        ledger.close()
    out["ok"] = True
    return out

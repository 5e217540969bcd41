"""Archived and live events read as one log: `charter log query` and `charter archive export`.

Entries up to the archive's head are read from the sealed segments (segments whose envelope time
range misses the query's are skipped unopened); the entries after it from the live log: charter.db
read directly (filtered in SQL), or, with `[bus] backend = "nats"`, the JetStream stream read back
through its EventLog. Each entry is read exactly once, whichever side holds it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from charter.archive.layout import Layout
from charter.archive.segments import archive_head, iter_records
from charter.bus.subjects import matches
from charter.db import connect

if TYPE_CHECKING:
    from charter.config import BusConfig


@dataclass
class Query:
    subject: str | None = None  # NATS pattern: `*` one token, `>` the rest
    sender: str | None = None  # an agent id or "operator"
    since_ms: int | None = None  # envelope ts >= since
    until_ms: int | None = None  # envelope ts < until
    text: str | None = None  # case-insensitive substring of the envelope's JSON
    after_seq: int = 0
    until_seq: int | None = None

    def accepts(self, env: dict[str, Any], raw: bytes) -> bool:
        ts = env.get("ts", 0)
        if self.since_ms is not None and ts < self.since_ms:
            return False
        if self.until_ms is not None and ts >= self.until_ms:
            return False
        if self.sender is not None and env.get("sender") != self.sender:
            return False
        if self.subject is not None and not matches(self.subject, str(env.get("subject", ""))):
            return False
        if self.text is not None and self.text.lower() not in raw.decode("utf-8", "replace").lower():
            return False
        return True


def _event(seq: int, h: bytes, prev: bytes, raw: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    env = orjson.loads(raw)
    return {"seq": seq, "hash": h.hex(), "prev": prev.hex(), "source": source, "envelope": env}, raw


def events(archive_root: Path, db_path: Path | None, query: Query | None = None,
           bus: BusConfig | None = None) -> Iterator[dict[str, Any]]:
    """Matching events in sequence order: {seq, hash, prev, source: archive|live, envelope}.

    `db_path` None: the archive only. `bus`: the configured log, when it is not charter.db."""
    q = query or Query()
    layout = Layout(archive_root)
    archived, _h, _f, _n = archive_head(layout)
    last = q.after_seq
    for seq, h, prev, raw in iter_records(layout, after_seq=q.after_seq, until_seq=q.until_seq,
                                          since_ts=q.since_ms, until_ts=q.until_ms):
        last = seq
        try:
            event, _ = _event(seq, h, prev, raw, "archive")
        except orjson.JSONDecodeError:
            continue
        if q.accepts(event["envelope"], raw):
            yield event
    last = max(last, archived)
    if db_path is None or (q.until_seq is not None and last >= q.until_seq):
        return
    if bus is not None and bus.backend != "sqlite":
        yield from _live_from_log(bus, db_path, q, last)
        return
    if not db_path.exists():
        return
    db = connect(db_path, readonly=True)
    try:
        sql = "SELECT seq, hash, prev, raw FROM log WHERE seq > ?"
        args: list[Any] = [last]
        if q.until_seq is not None:
            sql += " AND seq <= ?"
            args.append(q.until_seq)
        if q.since_ms is not None:
            sql += " AND ts >= ?"
            args.append(q.since_ms)
        if q.until_ms is not None:
            sql += " AND ts < ?"
            args.append(q.until_ms)
        if q.sender is not None:
            sql += " AND sender = ?"
            args.append(q.sender)
        cur = db.execute(sql + " ORDER BY seq", args)
        while batch := cur.fetchmany(1000):
            for seq, h, prev, raw in batch:
                raw = bytes(raw)
                try:
                    event, _ = _event(seq, bytes(h), bytes(prev), raw, "live")
                except orjson.JSONDecodeError:
                    continue
                if q.accepts(event["envelope"], raw):
                    yield event
    except sqlite3.Error:
        return
    finally:
        db.close()


def _live_from_log(bus: BusConfig, db_path: Path, q: Query, after: int) -> Iterator[dict[str, Any]]:
    """The live entries after `after` read through the configured EventLog (NATS), 1,000 at a time,
    on a private event loop so that this stays a plain generator for the CLI."""
    from charter.bus.log.backends import open_log

    loop = asyncio.new_event_loop()
    log = open_log(bus, db_path)
    try:
        cursor = after
        while True:
            batch = loop.run_until_complete(log.read(cursor, 1000))
            if not batch:
                return
            for e in batch:
                if q.until_seq is not None and e.seq > q.until_seq:
                    return
                cursor = e.seq
                if q.sender is not None and e.sender != q.sender:
                    continue
                try:
                    event, _ = _event(e.seq, e.hash, e.prev, e.raw, "live")
                except orjson.JSONDecodeError:
                    continue
                if q.accepts(event["envelope"], e.raw):
                    yield event
    finally:
        loop.run_until_complete(log.close())
        loop.close()


def resolve_sender(db_path: Path, ref: str) -> str:
    """An agent name becomes its id; ids and `operator` pass through."""
    if ref == "operator" or ref.startswith("agt_") or not db_path.exists():
        return ref
    db = connect(db_path, readonly=True)
    try:
        row = db.execute("SELECT id FROM agents WHERE name = ? ORDER BY issued_at DESC LIMIT 1", (ref,)).fetchone()
    except sqlite3.Error:
        row = None
    finally:
        db.close()
    return row[0] if row else ref

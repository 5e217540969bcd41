"""A ledger kept in charter.db by an older Charter, moved once into budget.db.

The ledger's tables used to live in charter.db beside the log (see `Ledger` for why they no longer
do). The first opening by this version copies them, spend ids included, into budget.db in one
transaction that also records the move (`ledger_meta.moved_from`, with a digest of every row
copied), makes that copy durable (fsync of the WAL and of the home directory), and only then drops
the tables from charter.db in a second transaction. A crash between the two leaves both copies;
the next opening finds the record, checks that charter.db's rows are still exactly those copied,
and finishes the drop.

charter.db's ledger lock is held throughout (budget.db's during the copy), so no older writer of
charter.db can book between the copy and the drop. A daemon of the older version still running on
this home afterwards finds its tables gone and fails its reservations (closed), rather than spending
against an empty budget. Should charter.db hold ledger rows that budget.db lacks, or rows changed
since they were copied, the move stops with an error naming both files: nothing is dropped, nothing
is merged by guess.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from charter.budget.ledger import COLUMN_DEFAULTS, KEYS, TABLES, Ledger
from charter.db import connect, select_list
from charter.errors import CONFLICT, CharterError

log = logging.getLogger("charter.budget")

MOVED = "moved_from"


def _tables(db: sqlite3.Connection) -> list[str]:
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [t for t in TABLES if t in names]


def _ids(db: sqlite3.Connection, table: str) -> set[object]:
    return {r[0] for r in db.execute(f"SELECT id FROM {table}")}


def _rows(db: sqlite3.Connection, present: list[str],
          columns: dict[str, str] | None = None) -> dict[str, list[tuple[object, ...]]]:
    """Every present table's rows in key order, in `columns` (this version's, by default; a column
    the table predates is read as its default)."""
    columns = columns or TABLES
    return {t: db.execute(f"SELECT {select_list(db, t, columns[t], COLUMN_DEFAULTS)} FROM {t} "
                          f"ORDER BY {KEYS[t]}").fetchall() for t in present}


def _digest(rows: dict[str, list[tuple[object, ...]]], columns: dict[str, str]) -> str:
    """What was copied, to recognise it again: each row as its columns' names and values, so the
    digest means the same to a later version with more columns. A table with no rows counts as absent."""
    h = hashlib.sha256()
    for table in sorted(t for t, found in rows.items() if found):
        names = [c.strip() for c in columns[table].split(",")]
        h.update(json.dumps([table, [dict(zip(names, row, strict=True)) for row in rows[table]]],
                            separators=(",", ":"), sort_keys=True).encode())
    return h.hexdigest()


# The columns 9d3615e..eb52d7a digested, positionally (`_digest_positional`), whatever comes later.
FIRST_DIGEST_COLUMNS = {
    "budget_limits": "scope, unit, period, hard, soft_ratio, updated_at",
    "budget_usage": "scope, unit, period, period_key, reserved, committed, alerted",
    "reservations": "id, agent_id, role, model, action, usd, tokens, charges, state, created_at, expires_at, "
                    "closed_at, on_expiry",
    "spend": "id, reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, overrun",
}


def _digest_positional(rows: dict[str, list[tuple[object, ...]]]) -> str:
    """The digest as 9d3615e..eb52d7a recorded it: each row's values only, in `FIRST_DIGEST_COLUMNS`."""
    h = hashlib.sha256()
    for table in sorted(t for t, found in rows.items() if found):
        h.update(json.dumps([table, rows[table]], separators=(",", ":")).encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """A new file (budget.db, its WAL) survives a power cut only once its directory entry does."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_ledger(old: Path, new: Path) -> int:
    """Move the ledger tables from `old` (charter.db) into `new` (budget.db) if `old` still has
    them; returns how many rows were copied (0 when there was nothing to move)."""
    if not old.exists():
        return 0
    src = connect(old)
    try:
        if not _tables(src):
            return 0
        lock = os.open(old.with_name(old.name + ".ledger.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # an older writer of charter.db's ledger waits (or has finished)
            present = _tables(src)  # again, locked: another process starting at once may have moved them
            if not present:
                return 0
            ledger = Ledger(new, background_checkpoints=False, synchronous="full")  # the copy's COMMIT fsyncs
            try:
                moved = _copy(src, present, ledger, old, new)
            finally:
                ledger.close()
            _fsync_dir(new.parent)  # before the drop: never a moment with no durable copy
            src.execute("BEGIN IMMEDIATE")
            try:
                for table in [*present, "ledger_meta"]:  # (the last, only if a Ledger of this version made it)
                    src.execute(f"DROP TABLE IF EXISTS {table}")
                src.execute("COMMIT")
            except BaseException:
                src.execute("ROLLBACK")
                raise
        finally:
            os.close(lock)  # (and with it the flock)
    finally:
        src.close()
    if moved:
        log.info("moved the budget ledger from %s to %s: %d rows", old.name, new.name, moved,
                 extra={"fields": {"from": str(old), "to": str(new), "rows": moved}})
    return moved


def _copy(src: sqlite3.Connection, present: list[str], ledger: Ledger, old: Path, new: Path) -> int:
    """Copy every present table's rows into the ledger, in one transaction with the record of the
    move; or, when the record is there already (a move cut short), check that charter.db still holds
    exactly the rows that were copied, so that the drop loses nothing."""
    with ledger._txn(limits_changed=True) as db:  # noqa: SLF001 - the ledger's own lock and transaction
        done = db.execute("SELECT value FROM ledger_meta WHERE key = ?", (MOVED,)).fetchone()
        rows = _rows(src, present)
        if not any(rows.values()):
            return 0
        if done is not None:
            _check_left(src, db, present, rows, json.loads(done[0]), old, new)
            return 0
        if any(db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in TABLES):
            _refuse(old, new, f"{new.name} holds a ledger already")
        copied = 0
        for table, found in rows.items():
            marks = ",".join("?" * len(TABLES[table].split(",")))
            db.executemany(f"INSERT INTO {table} ({TABLES[table]}) VALUES ({marks})", found)
            copied += len(found)
        db.execute("INSERT INTO ledger_meta VALUES (?, ?)",
                   (MOVED, json.dumps({"path": str(old), "at_ms": time.time_ns() // 1_000_000, "rows": copied,
                                       "sha256": _digest(rows, TABLES), "columns": TABLES})))
        return copied


def _check_left(src: sqlite3.Connection, db: sqlite3.Connection, present: list[str],
                rows: dict[str, list[tuple[object, ...]]], moved: dict[str, object], old: Path, new: Path) -> None:
    """Refuse unless what charter.db still holds is what was copied: a settlement, a release or a
    limit that an older writer changed there after the copy would otherwise be dropped unseen."""
    at = moved.get("at_ms")
    when = "after the ledger moved" + (f" ({datetime.fromtimestamp(at / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC)"
                                       if isinstance(at, int) else "")
    left = {t: len(_ids(src, t) - _ids(db, t)) if t in present else 0 for t in ("reservations", "spend")}
    if any(left.values()):
        _refuse(old, new, f"it has {left['reservations']} reservations and {left['spend']} spend rows "
                f"that {new.name} lacks, written {when}")
    if "sha256" not in moved:  # recorded by a version that kept no digest: checked by its ids only
        return
    columns = moved.get("columns")
    if isinstance(columns, dict):  # read in the columns copied then, whatever this version adds
        columns = {**TABLES, **columns}
        digest = _digest(_rows(src, present, columns), columns)
    else:  # recorded before the columns were: the values only, in the columns of then
        digest = _digest_positional(_rows(src, present, FIRST_DIGEST_COLUMNS))
    if digest != moved["sha256"]:
        _refuse(old, new, f"its ledger rows were changed {when}: a settlement, release or limit that "
                f"{new.name} does not have")


def _refuse(old: Path, new: Path, why: str) -> None:
    raise CharterError(CONFLICT, f"the budget ledger in {old} cannot be moved into {new}: {why}. Nothing was "
                       f"changed; keep the one that is right (move the other file's tables aside) and start again",
                       "budget")

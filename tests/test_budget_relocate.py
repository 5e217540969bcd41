"""The ledger in its own file: a home from before budget.db has its ledger moved out of charter.db
once, exactly (every row, every id, held reservations still held), a move cut short is finished,
and anything that would lose or merge spend by guess stops with an error that names both files."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from charter.budget.ledger import TABLES, Ledger, Limit
from charter.budget.relocate import move_ledger
from charter.budget.store import open_ledger
from charter.config import Home
from charter.errors import CONFLICT, CharterError
from conftest import make_home

OLD_SCHEMA = (Path(__file__).parent / "golden" / "ledger_schema_36415ef.sql").read_text()
NOW = 1_775_000_000_000  # a fixed instant (ms), inside one UTC day
LIMITS = [Limit("global", "usd", "day", 10_000_000), Limit("agent:agt_a", "tokens", "day", 1_000_000)]


def older_home(root: Path) -> tuple[Home, dict[str, str]]:
    """A home as an older Charter left it: the ledger's tables in charter.db, budget.db absent.
    One reservation of each kind: settled (with its spend row), released, and held (a gateway call
    in flight when that daemon stopped, to be booked in full at its expiry)."""
    home = make_home(root)
    home.budget_db_path.unlink()
    old_schema(home.db_path)
    old = Ledger(home.db_path, background_checkpoints=False)  # writes its rows into the older tables
    for lim in LIMITS:
        old.set_limit(lim)
    settled = old.reserve(agent_id="agt_a", role="worker", usd=5_000, tokens=300, limits=LIMITS, now=NOW)
    old.settle(settled.id, usd=1_234, tokens_in=10, tokens_out=20, now=NOW + 1)
    released = old.reserve(agent_id="agt_a", role="worker", usd=7_000, tokens=300, limits=LIMITS, now=NOW + 2)
    old.release(released.id, now=NOW + 3)
    held = old.reserve(agent_id="agt_a", role="worker", usd=9_000, tokens=400, limits=LIMITS, on_expiry="book",
                       ttl_s=120, now=NOW + 4)
    old.close()
    as_it_was(home.db_path)
    return home, {"settled": settled.id, "released": released.id, "held": held.id}


def old_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()


def as_it_was(path: Path) -> None:
    """Take away what a Ledger of this version adds to the older tables: its index, its meta table."""
    db = sqlite3.connect(path)
    db.executescript("DROP INDEX reservations_held_expiry; DROP TABLE ledger_meta;")
    db.close()


def rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {t: sorted(db.execute(f"SELECT {TABLES[t]} FROM {t}").fetchall()) for t in TABLES if t in names}
    finally:
        db.close()


def test_an_older_homes_ledger_moves_into_budget_db_exactly(tmp_path: Path) -> None:
    home, ids = older_home(tmp_path / "home")
    before = rows(home.db_path)
    assert len(before["reservations"]) == 3 and len(before["spend"]) == 1
    db = sqlite3.connect(home.db_path)
    schema = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'reservations%'").fetchall())
    db.close()
    assert "WITHOUT ROWID" not in schema["reservations"] and "reservations_held" in schema  # the older layout

    ledger = open_ledger(home, home.load_config())
    try:
        assert rows(home.budget_db_path) == before  # every row of every table, ids and all
        assert rows(home.db_path) == {}  # and none left behind to be read by mistake
        assert stat.S_IMODE(home.budget_db_path.stat().st_mode) == 0o600
        usage = ledger.usage(LIMITS, now=NOW)
        assert [(u["reserved"], u["committed"]) for u in usage] == [(9_000, 1_234), (400, 30)]
        # the held reservation is still a reservation: settled here as the gateway would settle it
        ledger.settle(ids["held"], usd=2_000, tokens_in=50, tokens_out=60, now=NOW + 5)
        assert [(u["reserved"], u["committed"]) for u in ledger.usage(LIMITS, now=NOW)] == [(0, 3_234), (0, 140)]
        with pytest.raises(CharterError) as exc:
            ledger.release(ids["released"])
        assert exc.value.code == CONFLICT  # closed reservations stay closed
    finally:
        ledger.close()
    assert move_ledger(home.db_path, home.budget_db_path) == 0  # done once: a later opening changes nothing


def test_a_very_old_ledger_without_on_expiry_moves_with_its_default(tmp_path: Path) -> None:
    home, ids = older_home(tmp_path / "home")
    db = sqlite3.connect(home.db_path)
    db.execute("ALTER TABLE reservations DROP COLUMN on_expiry")  # as it was before the column
    db.close()
    assert move_ledger(home.db_path, home.budget_db_path) == 3 + 1 + 2 + 2  # reservations, spend, limits, usage
    ledger = Ledger(home.budget_db_path, background_checkpoints=False)
    try:
        # reserved under the promise of giving its money back: its expiry still does
        assert ledger.sweep(now=NOW + 10 * 60_000) == 1
        assert [u["committed"] for u in ledger.usage(LIMITS, now=NOW)] == [1_234, 30]
    finally:
        ledger.close()


def test_a_move_cut_short_between_copy_and_drop_is_finished(tmp_path: Path) -> None:
    """Killed after budget.db committed the copy and before charter.db dropped its tables: both hold
    the same rows. The next opening drops charter.db's and copies nothing twice."""
    home, _ = older_home(tmp_path / "home")
    before = rows(home.db_path)
    move_ledger(home.db_path, home.budget_db_path)
    restore(home, before)  # the state the kill would have left
    assert move_ledger(home.db_path, home.budget_db_path) == 0
    assert rows(home.db_path) == {} and rows(home.budget_db_path) == before


def test_rows_changed_in_charter_db_after_a_move_cut_short_stop_it(tmp_path: Path) -> None:
    """Cut short, then an older daemon released a reservation in charter.db: same ids in both files,
    but dropping charter.db's tables would lose that release."""
    home, ids = older_home(tmp_path / "home")
    before = rows(home.db_path)
    move_ledger(home.db_path, home.budget_db_path)
    restore(home, before)
    stale = Ledger(home.db_path, background_checkpoints=False)
    stale.release(ids["held"], now=NOW + 5)
    stale.close()
    as_it_was(home.db_path)
    changed = rows(home.db_path)
    with pytest.raises(CharterError) as exc:
        move_ledger(home.db_path, home.budget_db_path)
    assert exc.value.code == CONFLICT and "changed after the ledger moved" in exc.value.message
    assert rows(home.db_path) == changed and rows(home.budget_db_path) == before  # nothing dropped, nothing merged


def test_a_move_recorded_without_a_digest_is_finished_by_its_ids(tmp_path: Path) -> None:
    """A move cut short by the version before the digest: its record has none, and the ids decide."""
    home, _ = older_home(tmp_path / "home")
    before = rows(home.db_path)
    move_ledger(home.db_path, home.budget_db_path)
    db = sqlite3.connect(home.budget_db_path)
    with db:
        db.execute("UPDATE ledger_meta SET value = json_remove(value, '$.sha256') WHERE key = 'moved_from'")
    db.close()
    restore(home, before)
    assert move_ledger(home.db_path, home.budget_db_path) == 0
    assert rows(home.db_path) == {} and rows(home.budget_db_path) == before


def test_a_move_recorded_by_a_version_with_fewer_columns_is_finished_by_a_later_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record names the columns it digested: a later version, whose ledger has a column more,
    recognises the rows that were copied instead of refusing a move that lost nothing."""
    import charter.budget.relocate as relocate

    home, _ = older_home(tmp_path / "home")
    before = rows(home.db_path)
    earlier = {**TABLES, "reservations": TABLES["reservations"].replace(", on_expiry", "")}
    monkeypatch.setattr(relocate, "TABLES", earlier)  # the version that moved it knew no on_expiry
    move_ledger(home.db_path, home.budget_db_path)
    monkeypatch.undo()
    restore(home, before)
    assert move_ledger(home.db_path, home.budget_db_path) == 0
    assert rows(home.db_path) == {}


def test_a_move_recorded_with_the_first_digest_is_still_checked(tmp_path: Path) -> None:
    """A record from before the columns were kept (a digest of the values only) is checked as it
    was made: the same rows finish the move, a changed row stops it."""
    from charter.budget.relocate import FIRST_DIGEST_COLUMNS, _digest_positional, _rows

    for changed in (False, True):
        home, ids = older_home(tmp_path / f"home-{changed}")
        before = rows(home.db_path)
        move_ledger(home.db_path, home.budget_db_path)
        restore(home, before)
        src = sqlite3.connect(home.db_path)
        first = _digest_positional(_rows(src, list(TABLES), FIRST_DIGEST_COLUMNS))
        src.close()
        db = sqlite3.connect(home.budget_db_path)
        with db:
            db.execute("UPDATE ledger_meta SET value = json_set(json_remove(value, '$.columns'), '$.sha256', ?) "
                       "WHERE key = 'moved_from'", (first,))
        db.close()
        if not changed:
            assert move_ledger(home.db_path, home.budget_db_path) == 0 and rows(home.db_path) == {}
            continue
        stale = Ledger(home.db_path, background_checkpoints=False)
        stale.release(ids["held"], now=NOW + 5)
        stale.close()
        as_it_was(home.db_path)
        with pytest.raises(CharterError) as exc:
            move_ledger(home.db_path, home.budget_db_path)
        assert exc.value.code == CONFLICT and "changed after the ledger moved" in exc.value.message


def test_the_copy_is_durable_before_charter_db_lets_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """budget.db's directory entry is synced to disk while charter.db still holds the tables: a power
    cut at any moment leaves at least one whole ledger."""
    home, _ = older_home(tmp_path / "home")
    before = rows(home.db_path)
    seen: list[tuple[bool, dict[str, list[tuple[object, ...]]]]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) and os.path.samestat(os.fstat(fd), home.root.stat()):
            seen.append((bool(rows(home.db_path)), rows(home.budget_db_path)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    move_ledger(home.db_path, home.budget_db_path)
    assert seen == [(True, before)]
    db = sqlite3.connect(home.budget_db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_rows_written_to_charter_db_after_the_move_stop_it_and_nothing_is_dropped(tmp_path: Path) -> None:
    """An older daemon started on this home after the move wrote its own reservations to charter.db:
    dropping them would lose spend, merging them would be a guess."""
    home, _ = older_home(tmp_path / "home")
    move_ledger(home.db_path, home.budget_db_path)
    stale = Ledger(home.db_path, background_checkpoints=False)  # an older version's ledger, recreated
    stale.reserve(agent_id="agt_b", role="worker", usd=1, tokens=1, limits=[], now=NOW)
    stale.close()
    with pytest.raises(CharterError) as exc:
        open_ledger(home, home.load_config())
    assert exc.value.code == CONFLICT
    assert str(home.db_path) in exc.value.message and str(home.budget_db_path) in exc.value.message
    assert "1 reservations" in exc.value.message
    assert len(rows(home.db_path)["reservations"]) == 1  # still there, for the operator to decide


def test_two_ledgers_are_not_merged(tmp_path: Path) -> None:
    home, _ = older_home(tmp_path / "home")
    new = Ledger(home.budget_db_path, background_checkpoints=False)  # budget.db began a ledger of its own
    new.reserve(agent_id="agt_c", role="worker", usd=1, tokens=1, limits=[], now=NOW)
    new.close()
    before = rows(home.db_path), rows(home.budget_db_path)
    with pytest.raises(CharterError) as exc:
        move_ledger(home.db_path, home.budget_db_path)
    assert exc.value.code == CONFLICT and "holds a ledger already" in exc.value.message
    assert (rows(home.db_path), rows(home.budget_db_path)) == before


def test_an_older_ledger_still_open_fails_closed_after_the_move(tmp_path: Path) -> None:
    """An older daemon's ledger, open while the move runs, cannot spend against an empty budget:
    its tables are gone and its next reservation fails."""
    home, _ = older_home(tmp_path / "home")
    running = Ledger(home.db_path, background_checkpoints=False)
    try:
        move_ledger(home.db_path, home.budget_db_path)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            running.reserve(agent_id="agt_a", role="worker", usd=1, tokens=1, limits=LIMITS, now=NOW + 9)
    finally:
        running.close()


def test_processes_starting_at_once_move_it_once(tmp_path: Path) -> None:
    """A daemon and a CLI command started together on an older home: one moves the ledger, the
    others find it moved, and no one fails."""
    home, _ = older_home(tmp_path / "home")
    before = rows(home.db_path)
    go = tmp_path / "go"
    script = ("import os, sys, time\n"
              "from pathlib import Path\n"
              "from charter.budget.relocate import move_ledger\n"
              "while not os.path.exists(sys.argv[1]): time.sleep(0.001)\n"
              "print(move_ledger(Path(sys.argv[2]), Path(sys.argv[3])))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go), str(home.db_path), str(home.budget_db_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(0.5)  # all of them waiting
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert sorted(int(out) for out, _ in outs) == [0, 0, 0, 8]
    assert rows(home.db_path) == {} and rows(home.budget_db_path) == before


def test_a_fresh_home_has_its_ledger_in_budget_db_from_the_start(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    assert stat.S_IMODE(home.budget_db_path.stat().st_mode) == 0o600
    assert rows(home.db_path) == {} and set(rows(home.budget_db_path)) == set(TABLES)
    assert move_ledger(home.db_path, home.budget_db_path) == 0


def test_the_ledger_checkpoints_its_wal_in_the_background(tmp_path: Path) -> None:
    """Its commits leave the WAL to a thread of its own: the database file takes the pages a moment
    later, with no commit having waited for it."""
    path = tmp_path / "budget.db"
    ledger = Ledger(path)
    try:
        size = path.stat().st_size
        for i in range(50):
            r = ledger.reserve(agent_id="agt_a", role="worker", usd=10, tokens=10, limits=LIMITS, now=NOW + i)
            ledger.settle(r.id, usd=5, tokens_in=2, tokens_out=3, now=NOW + i)
        assert "charter-ledger-checkpoint" in {t.name for t in threading.enumerate()}
        deadline = time.monotonic() + 10
        while path.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.stat().st_size > size
        if sys.platform == "linux":
            tid = {t.name: t.native_id for t in threading.enumerate()}["charter-ledger-checkpoint"]
            assert os.sched_getscheduler(tid) == os.SCHED_IDLE
    finally:
        ledger.close()
    assert "charter-ledger-checkpoint" not in {t.name for t in threading.enumerate()}


def restore(home: Home, before: dict[str, list[tuple[object, ...]]]) -> None:
    """Put the ledger tables back into charter.db with these rows."""
    old_schema(home.db_path)
    db = sqlite3.connect(home.db_path)
    with db:
        for table, found in before.items():
            marks = ",".join("?" * len(TABLES[table].split(",")))
            db.executemany(f"INSERT INTO {table} ({TABLES[table]}) VALUES ({marks})", found)
    db.close()

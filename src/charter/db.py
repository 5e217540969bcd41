"""SQLite connections with the settings Charter relies on: WAL, foreign keys, a busy timeout."""

from __future__ import annotations

import sqlite3
from pathlib import Path


WAL_BACKSTOP_PAGES = 4000  # a writer's own (inline) automatic checkpoint, instead of SQLite's 1000


def connect(path: Path, *, synchronous: str = "normal", readonly: bool = False) -> sqlite3.Connection:
    """Open the database. Autocommit mode: every transaction is an explicit BEGIN ... COMMIT.

    In WAL mode `synchronous=NORMAL` makes a committed transaction survive a killed process (the
    WAL is in the OS page cache); `FULL` also fsyncs it, to survive a power cut.
    """
    if readonly:
        # as a URI, escaped: a '#', '?' or '%' in the path would otherwise name another file
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        # Every connection that writes charter.db shares one WAL. The daemon's log checkpoints it in a
        # background thread (bus/log/sqlite.py); a writer's own automatic checkpoint, which runs inline
        # in the COMMIT that crosses the threshold (fsyncs included), stays only as a backstop, on
        # every connection alike: at SQLite's default of 1000 pages the ledger's commits on priced
        # model calls crossed it several times a second and stalled the event loop for milliseconds.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn

"""SQLite connections with the settings Charter relies on: WAL, foreign keys, a busy timeout."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path, *, synchronous: str = "normal", readonly: bool = False) -> sqlite3.Connection:
    """Open the database. Autocommit mode: every transaction is an explicit BEGIN ... COMMIT.

    In WAL mode `synchronous=NORMAL` makes a committed transaction survive a killed process (the
    WAL is in the OS page cache); `FULL` also fsyncs it, to survive a power cut.
    """
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn

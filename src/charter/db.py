"""SQLite connections with the settings Charter relies on: WAL, foreign keys, a busy timeout."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
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
        # Every connection that writes a file shares its WAL. The daemon checkpoints charter.db's and
        # budget.db's in background threads (`Checkpointer`); a writer's own automatic checkpoint, which runs inline
        # in the COMMIT that crosses the threshold (fsyncs included), stays only as a backstop, on
        # every connection alike: at SQLite's default of 1000 pages the ledger's commits on priced
        # model calls crossed it several times a second and stalled the event loop for milliseconds.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def select_list(db: sqlite3.Connection, table: str, columns: str, defaults: dict[str, str]) -> str:
    """`columns` (comma-separated) as a SELECT list for a table that may predate some of them: a
    column the table lacks is read as its default (an SQL literal in `defaults`)."""
    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    return ", ".join(c if c in have else defaults[c] for c in (c.strip() for c in columns.split(",")))


# SQLite's automatic checkpoint runs inline in the COMMIT that pushes the WAL past 1000 pages: every
# ~270 single-envelope appends, one of them took several milliseconds longer (fsync of the WAL and
# the database file), and so did every request queued behind it. With a background checkpointer the
# automatic one stays only as a backstop: it lets the WAL restart from its beginning (which needs a
# moment when every frame is copied back) and it finds most frames already copied.
CHECKPOINT_EVERY = 0.1  # seconds between background checkpoints, while there are new commits


def yield_to_requests() -> None:
    """Run this thread only when the core has nothing else to do (Linux's SCHED_IDLE; nice 19
    where that is refused).

    A checkpoint takes a few milliseconds of CPU. Sharing a core with the event loop at the same
    priority, it held up whatever request arrived meanwhile: at one request at a time, about one in
    forty. At nice 19 the scheduler still gave it whole slices now and then, with the loop's thread
    waiting (5-10 ms seen under load); a SCHED_IDLE thread gives the core up as soon as the loop's
    thread wakes (gateway_compare.py with a budget, against nice 19: p99 x0.68 at c=1, x0.76 and
    x0.89 at c=16). The checkpoint releases the GIL inside SQLite, and the inline backstop
    checkpoint still bounds the WAL should it fall behind on a core that is never idle.
    """
    if sys.platform != "linux":
        return  # elsewhere a thread id is not a pid: setpriority would miss, or renice the process
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class Checkpointer:
    """A thread that runs PASSIVE checkpoints of one database's WAL, which never wait for (or block)
    readers or writers. Its owner sets `dirty` after each commit.

    Durability is unchanged: a transaction is durable at its COMMIT whatever the checkpoints do, and
    a checkpoint syncs exactly as SQLite's automatic one does (same `synchronous` setting).
    """

    def __init__(self, path: Path, synchronous: str, name: str) -> None:
        self._path, self._synchronous = path, synchronous
        self.dirty = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        yield_to_requests()
        try:
            db = connect(self._path, synchronous=self._synchronous)
        except sqlite3.Error:
            return  # the writer's automatic checkpoint still does the job
        try:
            while not self._stop.wait(CHECKPOINT_EVERY):
                if self.dirty:
                    self.dirty = False
                    try:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error:
                        pass  # busy or failing: the next pass, or the backstop, retries
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

"""Retention: remove old entries from the hot database once they are archived (and mirrored).

The chain must stay verifiable across the cut. Rather than leave tombstone rows (which every reader
of the log would have to learn to skip), the removed prefix is replaced by one row in a table of its
own, `log_horizon`:

    seq       entries with seq <= this were archived and removed
    hash      the chain hash of entry `seq`: the first remaining entry links to it
    witness   JSON: each agent's key and status as of `seq`, so signature checks of later entries
              (`charter log verify`) still know who was enrolled before the cut
    pruned_at, pruned (how many entries were removed in all)

`verify_file` (and so `charter log verify`) starts its chain from the horizon; `SqliteLog.head`,
`read` and `append` are unchanged because the newest entry is never removed. `charter archive
verify` checks that the horizon's hash is the archived entry's hash, so a horizon moved or forged
in the database alone shows.

An entry is removed only if (1) it is older than `[archive] hot_retention`, (2) it is archived and
covered by a signed checkpoint, (3) every configured mirror holds it and verified after its last
copy, and (4) its hash in the database equals the archived one. Removal is one IMMEDIATE
transaction: the horizon moves and the rows go together or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from charter.archive.layout import ArchiveError, Layout
from charter.archive.segments import iter_records
from charter.bus.envelope import parse
from charter.bus.log.sqlite import read_horizon
from charter.bus.log.witness import KeyWitness
from charter.db import connect
from charter.errors import CharterError
from charter.identity.keys import PublicKey
from charter.identity.registry import now_ms

SCHEMA = """
CREATE TABLE IF NOT EXISTS log_horizon (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    seq       INTEGER NOT NULL,
    hash      BLOB NOT NULL,
    witness   BLOB,
    pruned_at INTEGER NOT NULL,
    pruned    INTEGER NOT NULL
);
"""


# Entries removed per call (one transaction). Its DELETE holds charter.db's write lock, and the
# daemon's appends wait for it on the event loop: 50,000 at a time held it ~0.3 s here, 2,000 about
# 10 ms. The price: a segment's file is read again for each batch that falls in it.
BATCH = 2_000


def prune(db_path: Path, layout: Layout, *, safe_seq: int, cutoff_ts: int, root: PublicKey,
          batch: int | None = None) -> dict[str, Any]:
    """Remove entries with seq <= safe_seq and ts < cutoff_ts (and everything before them).

    `safe_seq` is what the caller established as archived, checkpointed and mirrored. The newest
    entry always stays. The caller holds the archive lock. Returns {pruned, horizon_seq}.
    """
    db = connect(db_path)
    try:
        db.executescript(SCHEMA)
        horizon = read_horizon(db)
        h_seq = horizon[0] if horizon else 0
        head = db.execute("SELECT MAX(seq) FROM log").fetchone()[0] or h_seq
        limit = min(safe_seq, head - 1)
        if limit <= h_seq:
            return {"pruned": 0, "horizon_seq": h_seq}
        row = db.execute("SELECT seq FROM log WHERE seq > ? AND seq <= ? AND ts >= ? ORDER BY seq LIMIT 1",
                         (h_seq, limit, cutoff_ts)).fetchone()
        target = min(limit, row[0] - 1) if row else limit
        target = min(target, h_seq + (batch or BATCH))
        if target <= h_seq:
            return {"pruned": 0, "horizon_seq": h_seq}

        witness = KeyWitness(root)
        if horizon and horizon[2]:
            witness.restore(horizon[2])
        hot = db.execute("SELECT seq, hash, subject, sender, raw FROM log WHERE seq > ? AND seq <= ? ORDER BY seq",
                         (h_seq, target))
        archived = iter_records(layout, after_seq=h_seq, until_seq=target)
        expected, last_hash = h_seq + 1, None
        for (seq, h, subject, sender, raw), rec in zip(hot, archived, strict=False):
            if seq != expected or rec[0] != seq or rec[1] != bytes(h):
                raise ArchiveError(f"entry {seq} in charter.db is not the archived entry {rec[0]}: nothing was "
                                   "removed; run `charter archive verify`")
            if sender == "operator" and subject.startswith("charter.agents."):
                try:
                    witness.check(parse(bytes(raw), max_bytes=2**31))
                except CharterError:
                    pass
            expected, last_hash = seq + 1, bytes(h)
        if expected != target + 1 or last_hash is None:
            raise ArchiveError(f"entries up to {target} are not all archived (stopped at {expected - 1}): nothing was removed")

        removed = target - h_seq
        total = removed + (db.execute("SELECT pruned FROM log_horizon WHERE id = 1").fetchone() or (0,))[0]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO log_horizon VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                       "seq = excluded.seq, hash = excluded.hash, witness = excluded.witness, "
                       "pruned_at = excluded.pruned_at, pruned = excluded.pruned",
                       (target, last_hash, orjson.dumps(witness.snapshot()), now_ms(), total))
            db.execute("DELETE FROM log WHERE seq > ? AND seq <= ?", (h_seq, target))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return {"pruned": removed, "horizon_seq": target}
    finally:
        db.close()


def horizon_of(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    db = connect(db_path, readonly=True)
    try:
        h = read_horizon(db)
        return h[0] if h else 0
    finally:
        db.close()

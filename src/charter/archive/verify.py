"""`charter archive verify`: recompute everything, trust nothing but the root public key.

What is recomputed, in one pass over the archive and one over the live database:

- every archived entry's chain hash from its raw bytes, its link to the entry before (across
  segment boundaries and on into the live log), and the sequence numbers (nothing missing,
  inserted or out of order);
- each segment's file digest, range, boundary hashes and Merkle root against its index;
- the archivist's certificates against the root key, each checkpoint's signature, the links
  between consecutive checkpoints (number, previous hash, nothing going backwards), each
  checkpoint's root over the archived entries it covers, an RFC 6962 consistency proof between
  consecutive checkpoints, and each checkpoint's view of the live head;
- the live log: its chain (from the retention boundary, if entries were pruned), every entry it
  shares with the archive (same hash), and that it is not shorter than a checkpoint saw;
- every checkpoint the log itself published (`charter.archive.checkpoints` events) has its file.

Every problem is a `Break` with a sequence number. Problems found on an entry itself (edited,
missing, inserted, reordered, truncated) name that entry exactly. Problems found only through
checkpoints or segment indexes (a forged or missing checkpoint, a root that no longer matches)
name the first entry that is no longer vouched for by an intact checkpoint. The report's
`first_bad_seq` is the smallest entry-level sequence number if there is one, else the smallest of
the others.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from charter.archive import checkpoints as cp
from charter.archive import identity
from charter.archive.layout import Layout
from charter.archive.merkle import Tree, root_of, verify_consistency
from charter.archive.segments import SegmentError, SegmentMeta, decode, decompress, load_meta
from charter.bus.envelope import parse
from charter.bus.log.base import GENESIS, entry_hash
from charter.bus.log.sqlite import read_horizon
from charter.bus.log.witness import KeyWitness
from charter.db import connect
from charter.errors import CharterError
from charter.identity.keys import PublicKey

EXACT = ("entry", "truncation")  # kinds that name the bad entry itself
_CP_SUBJECT = b'"subject":"' + cp.SUBJECT.encode() + b'"'
_OPERATOR = b'"sender":"operator"'

Progress = Callable[[int, int], None]


@dataclass
class Break:
    seq: int | None
    reason: str
    kind: str  # entry | truncation | segment | checkpoint | identity

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "reason": self.reason}


@dataclass
class ArchiveReport:
    path: str
    trust: str = ""
    archived: int = 0  # entries in the archive
    segments: int = 0
    checkpoints: int = 0
    live_checked: int = 0
    horizon_seq: int = 0  # entries up to here were pruned from the live database
    head_seq: int = 0
    head_hash: str = ""
    signatures: bool = False
    breaks: list[Break] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def first_bad(self) -> int | None:
        exact = [b.seq for b in self.breaks if b.kind in EXACT and b.seq is not None]
        if exact:
            return min(exact)
        other = [b.seq for b in self.breaks if b.seq is not None]
        return min(other) if other else None

    def sorted_breaks(self) -> list[Break]:
        return sorted(self.breaks, key=lambda b: (b.kind not in EXACT, b.seq if b.seq is not None else 1 << 62))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "path": self.path, "trust": self.trust, "archived": self.archived,
            "segments": self.segments, "checkpoints": self.checkpoints, "live_checked": self.live_checked,
            "horizon_seq": self.horizon_seq, "head_seq": self.head_seq, "head_hash": self.head_hash,
            "signatures": self.signatures, "first_bad_seq": self.first_bad,
            "breaks": [b.to_dict() for b in self.sorted_breaks()], "notes": self.notes,
        }


class _Checkpoint:
    __slots__ = ("number", "doc", "problems", "usable")

    def __init__(self, number: int, doc: Any) -> None:
        self.number, self.doc = number, doc
        self.problems: list[str] = []
        self.usable = False  # well-formed and signed by a certified key: its claims are checked


def verify_archive(root_dir: Path, *, db_path: Path | None = None, root: PublicKey | None = None,
                   signatures: bool = False, progress: Progress | None = None) -> ArchiveReport:
    """Verify the archive at `root_dir` (and the live database at `db_path`, if given).

    `root` pins the operator's root public key; without it, the key the archive's own certificates
    declare is used, and the report's `trust` says so.
    """
    return _Verifier(Layout(root_dir), db_path, root, signatures, progress).run()


class _Verifier:
    def __init__(self, layout: Layout, db_path: Path | None, root: PublicKey | None, signatures: bool,
                 progress: Progress | None) -> None:
        self.layout, self.db_path, self.root, self.progress = layout, db_path, root, progress
        self.report = ArchiveReport(str(layout.root), signatures=signatures)
        self.witness: KeyWitness | None = None
        self.signatures = signatures
        self.hashes = bytearray()  # archived entries' chain hashes, 32 bytes each, by position
        self.leaves = bytearray()
        self.published: list[tuple[int, Any]] = []  # (seq, checkpoint doc) found on the bus
        self.done = 0
        self.total = 0
        self.seen_break: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------

    def brk(self, seq: int | None, reason: str, kind: str = "entry") -> None:
        if kind in EXACT and seq is not None:
            if seq in self.seen_break:
                return
            self.seen_break.add(seq)
        self.report.breaks.append(Break(seq, reason, kind))

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, max(self.total, self.done))

    def archived_hash(self, seq: int) -> bytes | None:
        if 1 <= seq <= len(self.hashes) // 32:
            h = bytes(self.hashes[(seq - 1) * 32:seq * 32])
            return None if h == GENESIS else h  # all zeros: a placeholder for an entry the archive lacks
        return None

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> ArchiveReport:
        rep = self.report
        root = self.root
        if root is None:
            root = identity.declared_root(self.layout)
            if root is not None:
                rep.trust = (f"root key {root.key_id}, as the archive's own certificates declare it (not pinned: "
                             "pass --root-key or verify from the operator's home to pin it)")
        else:
            rep.trust = f"root key {root.key_id} (pinned)"
        if root is not None:
            keys, problems = identity.trusted_keys(self.layout, root)
            for p in problems:
                self.brk(None, p, "identity")
            if self.signatures:
                self.witness = KeyWitness(root)
        else:
            keys = {}
            rep.trust = "no root key: nothing pins the archivist's checkpoints"
        checkpoints = self.load_checkpoints(keys, root)
        metas = self.segment_plan()
        self.total = sum(m.count for _, m, _ in metas if m is not None) + self.live_count()
        self.walk_segments(metas)
        rep.archived = len(self.hashes) // 32
        tree = Tree(bytes(self.leaves))
        live_hashes = self.walk_live(checkpoints)
        self.check_checkpoints(checkpoints, tree, live_hashes)
        return rep

    # -- checkpoints: structure and signatures ---------------------------------------------

    def load_checkpoints(self, keys: dict[str, PublicKey], root: PublicKey | None) -> list[_Checkpoint]:
        out: list[_Checkpoint] = []
        expected, prev = 1, None
        for number, doc in cp.load_all(self.layout):
            c = _Checkpoint(number, doc)
            out.append(c)
            if doc is None:
                c.problems.append(f"checkpoint file {number} is unreadable")
                continue
            if bad := cp.malformed(doc):
                c.problems.append(f"checkpoint {number}: {bad}")
                continue
            if doc["number"] != number:
                c.problems.append(f"checkpoint file {number:08d}.json holds checkpoint number {doc['number']}")
                continue
            if root is not None and doc["origin"] != root.key_id:
                c.problems.append(f"checkpoint {number} belongs to another installation (origin {doc['origin']})")
                continue
            if why := cp.signature_problem(doc, keys):
                c.problems.append(f"checkpoint {number} is forged: {why}")
                continue
            c.usable = True
            if number != expected:
                missing = f"{expected}" if number == expected + 1 else f"{expected} to {number - 1}"
                c.problems.append(f"checkpoint {missing} is missing: checkpoint {number} follows {expected - 1}")
            elif prev is None and doc["prev"] != cp.ZERO:
                c.problems.append("checkpoint 1 links to an earlier checkpoint that does not exist")
            elif prev is not None and doc["prev"] != cp.checkpoint_hash(prev):
                c.problems.append(f"checkpoint {number} does not link to checkpoint {number - 1} (replaced or edited)")
            if prev is not None and (doc["tree_size"] < prev["tree_size"] or doc["head"]["seq"] < prev["head"]["seq"]):
                c.problems.append(f"checkpoint {number} goes backwards from checkpoint {prev['number']}")
            prev, expected = doc, number + 1
        self.report.checkpoints = len(out)
        return out

    # -- segments --------------------------------------------------------------------------

    def segment_plan(self) -> list[tuple[int, SegmentMeta | None, Path | None]]:
        layout = self.layout
        metas = dict(layout.meta_files())
        files = dict(layout.segment_files())
        last_meta = max(metas) if metas else 0
        plan: list[tuple[int, SegmentMeta | None, Path | None]] = []
        for number in sorted(set(metas) | set(files)):
            if number not in metas:
                if number > last_meta:
                    self.report.notes.append(f"segment {number:06d} has no index: an unfinished seal, ignored")
                    continue
                self.brk(None, f"segment {number:06d} has lost its index", "segment")
                plan.append((number, None, files[number]))
                continue
            try:
                meta = load_meta(metas[number])
            except SegmentError as exc:
                self.brk(None, f"segment {number:06d}: {exc}", "segment")
                plan.append((number, None, files.get(number)))
                continue
            if meta.segment != number:
                self.brk(meta.first_seq, f"segment index {number:06d} describes segment {meta.segment}", "segment")
            plan.append((number, meta, files.get(number)))
        self.report.segments = len(plan)
        numbers = [n for n, _, _ in plan]
        if numbers and numbers != list(range(1, len(numbers) + 1)):
            gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
            if gaps:
                self.report.notes.append(f"segment number(s) {', '.join(map(str, gaps[:5]))} are absent")
        return plan

    def walk_segments(self, plan: list[tuple[int, SegmentMeta | None, Path | None]]) -> None:
        expected, prev = 1, GENESIS
        hashes, leaves = self.hashes, self.leaves
        sha, eh = hashlib.sha256, entry_hash
        witness = self.witness
        for number, meta, path in plan:
            where = meta.first_seq if meta else expected
            if path is None:
                assert meta is not None  # the plan has a file for every segment without an index
                self.brk(where, f"segment {number:06d} is missing: entries {meta.first_seq} to {meta.last_seq} are gone")
                hashes += b"\x00" * 32 * meta.count  # keep positions aligned: its entries count as missing
                leaves += b"\x00" * 32 * meta.count
                expected, prev = meta.last_seq + 1, bytes.fromhex(meta.last_hash)
                continue
            blob = path.read_bytes()
            if meta is not None and (sha(blob).hexdigest() != meta.sha256 or len(blob) != meta.bytes):
                self.brk(meta.first_seq, f"segment {number:06d} differs from its index (SHA-256 of the file)", "segment")
            try:
                records = decode(decompress(blob))
            except SegmentError as exc:
                self.brk(where, f"segment {number:06d} cannot be read: {exc}")
                if meta is not None:  # keep positions aligned: its entries count as missing
                    hashes += b"\x00" * 32 * meta.count
                    leaves += b"\x00" * 32 * meta.count
                    expected, prev = meta.last_seq + 1, bytes.fromhex(meta.last_hash)
                continue
            own = bytearray()  # this segment's own leaves (no placeholders), for its index's root
            for seq, h, p, raw in records:
                if seq != expected:
                    if seq > expected:
                        gone = f"entry {expected} is" if seq == expected + 1 else f"entries {expected} to {seq - 1} are"
                        self.brk(expected, f"{gone} missing from the archive (segment {number:06d} goes on with {seq})")
                        if seq - expected < 1 << 24:  # keep positions aligned with seqs: placeholders for the gap
                            hashes += b"\x00" * 32 * (seq - expected)
                            leaves += b"\x00" * 32 * (seq - expected)
                    else:
                        self.brk(expected, f"segment {number:06d} holds seq {seq} where {expected} belongs: "
                                           "entries inserted or out of order")
                if p != prev:
                    self.brk(seq, f"archived entry {seq} does not link to the entry before it")
                if eh(p, seq, raw) != h:
                    self.brk(seq, f"archived entry {seq} was edited: its hash does not match its content")
                elif witness is not None:
                    self.check_signature(seq, raw)
                if _CP_SUBJECT in raw and _OPERATOR in raw:
                    self.note_published(seq, raw)
                hashes += h
                leaf = sha(b"\x00" + h).digest()
                leaves += leaf
                own += leaf
                prev, expected = h, seq + 1
            if meta is not None:
                self.check_meta(number, meta, records, bytes(own))
            self.tick(len(records))
        self.report.head_seq = len(hashes) // 32
        self.report.head_hash = prev.hex() if hashes else ""

    def check_meta(self, number: int, meta: SegmentMeta, records: list, leaves: bytes) -> None:
        problems = []
        if not records:
            problems.append("it holds no entries")
        else:
            if (meta.first_seq, meta.last_seq, meta.count) != (records[0][0], records[-1][0], len(records)):
                problems.append("its range")
            if meta.prev_hash != records[0][2].hex() or meta.last_hash != records[-1][1].hex():
                problems.append("its boundary hashes")
            if meta.root != root_of(leaves).hex():
                problems.append("its Merkle root")
        if problems:
            self.brk(meta.first_seq, f"segment {number:06d} does not match its index ({', '.join(problems)})", "segment")

    def check_signature(self, seq: int, raw: bytes) -> None:
        assert self.witness is not None
        try:
            env = parse(raw, max_bytes=2**31)
        except CharterError as exc:
            self.brk(seq, f"entry {seq} does not parse: {exc.message}")
            return
        if why := self.witness.check(env):
            self.brk(seq, f"entry {seq}: {why}")

    def note_published(self, seq: int, raw: bytes) -> None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if doc.get("subject") == cp.SUBJECT and doc.get("sender") == "operator":
            payload = doc.get("payload")
            if isinstance(payload, dict) and isinstance(payload.get("checkpoint"), dict):
                self.published.append((seq, payload["checkpoint"]))

    # -- the live database -----------------------------------------------------------------

    def live_count(self) -> int:
        if self.db_path is None or not self.db_path.exists():
            return 0
        try:
            db = connect(self.db_path, readonly=True)
            try:
                return db.execute("SELECT COUNT(*) FROM log").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            return 0

    def walk_live(self, checkpoints: list[_Checkpoint]) -> dict[int, bytes]:
        """Check the live log; return the live hashes at the seqs checkpoints name as their head."""
        wanted = {c.doc["head"]["seq"] for c in checkpoints if c.usable}
        found: dict[int, bytes] = {}
        if self.db_path is None:
            self.report.notes.append("no live database given: only the archive was checked")
            return found
        if not self.db_path.exists():
            self.brk(1, f"the live database {self.db_path} does not exist", "truncation")
            return found
        try:
            db = connect(self.db_path, readonly=True)
        except sqlite3.Error as exc:
            self.brk(1, f"the live database cannot be opened: {exc}", "truncation")
            return found
        try:
            self._walk_live(db, wanted, found)
        except sqlite3.DatabaseError as exc:
            self.brk(None, f"the live database is unreadable: {exc}", "segment")
        finally:
            db.close()
        return found

    def _walk_live(self, db: sqlite3.Connection, wanted: set[int], found: dict[int, bytes]) -> None:
        rep = self.report
        archived = len(self.hashes) // 32
        horizon = read_horizon(db)
        expected, prev = 1, GENESIS
        if horizon is not None:
            h_seq, h_hash, snapshot = horizon
            rep.horizon_seq = h_seq
            if h_seq > archived:
                self.brk(archived + 1, f"the live database dropped entries up to {h_seq}, but the archive ends at "
                                       f"{archived}: entries {archived + 1} to {h_seq} exist nowhere")
            elif self.archived_hash(h_seq) != h_hash:
                self.brk(h_seq, f"the live database's retention boundary (seq {h_seq}) does not match the archive")
            expected, prev = h_seq + 1, h_hash
        witness = self.witness
        cur = db.execute("SELECT seq, id, subject, sender, ts, kind, raw, hash, prev FROM log ORDER BY seq")
        last = horizon[0] if horizon else 0
        while batch := cur.fetchmany(2000):
            for seq, eid, subject, sender, ts, kind, raw, h, p in batch:
                raw, h, p = bytes(raw), bytes(h), bytes(p)
                if seq != expected:
                    if seq > expected:
                        gone = f"entry {expected} is" if seq == expected + 1 else f"entries {expected} to {seq - 1} are"
                        self.brk(expected, f"{gone} missing from the live database (it goes on with {seq})")
                    else:
                        self.brk(expected, f"the live database holds seq {seq} where {expected} belongs")
                if p != prev:
                    self.brk(seq, f"live entry {seq} does not link to the entry before it")
                content_ok = entry_hash(p, seq, raw) == h
                if not content_ok:
                    self.brk(seq, f"live entry {seq} was edited: its hash does not match its content")
                archived_h = self.archived_hash(seq)
                if archived_h is not None and archived_h != h:
                    self.brk(seq, f"live entry {seq} differs from the archived entry {seq}")
                if content_ok:
                    try:
                        env = parse(raw, max_bytes=2**31)
                        if (env.id, env.subject, env.sender, env.ts, env.kind) != (eid, subject, sender, ts, kind):
                            self.brk(seq, f"live entry {seq}: indexed columns differ from the signed envelope")
                        elif witness is not None and seq > archived and (why := witness.check(env)):
                            self.brk(seq, f"live entry {seq}: {why}")
                    except CharterError as exc:
                        self.brk(seq, f"live entry {seq} does not parse: {exc.message}")
                    if subject == cp.SUBJECT and sender == "operator" and seq > archived:
                        self.note_published(seq, raw)
                if seq in wanted:
                    found[seq] = h
                prev, expected, last = h, seq + 1, seq
                rep.live_checked += 1
            self.tick(len(batch))
        if last > rep.head_seq:
            rep.head_seq, rep.head_hash = last, prev.hex()
        self._live_head = last

    # -- checkpoints: what they claim ------------------------------------------------------

    def check_checkpoints(self, checkpoints: list[_Checkpoint], tree: Tree, live: dict[int, bytes]) -> None:
        archived = tree.size
        live_head = getattr(self, "_live_head", None)
        usable = [c for c in checkpoints if c.usable]
        previous: _Checkpoint | None = None
        for c in usable:
            doc = c.doc
            size, head_seq = doc["tree_size"], doc["head"]["seq"]
            if size > archived:
                self.brk(archived + 1, f"the archive is truncated: checkpoint {c.number} covers {size} entries, "
                                       f"the archive holds {archived}", "truncation")
            elif tree.root(size).hex() != doc["root"]:
                c.problems.append(f"checkpoint {c.number}'s root does not match the archived entries 1 to {size}")
            elif previous is not None and previous.doc["tree_size"] <= size and not c.problems:
                a = previous.doc["tree_size"]
                proof = tree.consistency_proof(a, size)
                if not verify_consistency(a, size, bytes.fromhex(previous.doc["root"]), bytes.fromhex(doc["root"]), proof):
                    c.problems.append(f"checkpoints {previous.number} and {c.number} are not consistent")
            want = bytes.fromhex(doc["head"]["hash"])
            got = self.archived_hash(head_seq) if head_seq <= archived else live.get(head_seq)
            if live_head is not None and head_seq > max(archived, live_head):
                end = max(archived, live_head)
                self.brk(end + 1, f"the log is truncated: checkpoint {c.number} saw it reach seq {head_seq}; "
                                  f"it ends at seq {end}", "truncation")
            elif got is not None and got != want:
                c.problems.append(f"checkpoint {c.number} saw seq {head_seq} with another hash than the log has now")
            previous = c
        by_number = {c.number: c for c in checkpoints}
        for seq, doc in self.published:
            number = doc.get("number") if isinstance(doc, dict) else None
            if type(number) is not int:
                continue
            c = by_number.get(number)
            if c is None and self.layout.checkpoint_path(number).exists():
                continue  # signed while this verification ran (a live daemon): the next run checks it
            if c is None:
                holder = _Checkpoint(number, None)
                holder.problems.append(f"checkpoint {number} is missing: the log published it at seq {seq}")
                checkpoints.append(holder)
                by_number[number] = holder
            elif c.doc is not None and cp.checkpoint_hash(c.doc) != cp.checkpoint_hash(doc):
                c.problems.append(f"checkpoint {number} differs from the one the log published at seq {seq}")
        # Problems found through checkpoints name the first entry no longer vouched for.
        vouched = 0
        for c in sorted(checkpoints, key=lambda c: c.number):
            if c.problems:
                for p in c.problems:
                    self.brk(vouched + 1, p, "checkpoint")
            elif c.usable:
                vouched = max(vouched, c.doc["tree_size"])
        if not usable and archived:
            self.report.notes.append("no valid checkpoint covers the archive yet")
        elif usable and usable[-1].doc["tree_size"] < archived:
            self.report.notes.append(f"entries {usable[-1].doc['tree_size'] + 1} to {archived} are archived but not yet "
                                     "under a checkpoint")

"""Sealed segments: runs of consecutive log entries, compressed with zstd, each with its index.

A segment file `NNNNNN.seg.zst` is one zstd frame whose content is

    header   "CHSEG\\x00v1" (8 bytes) | count (u32) | first seq (u64)             all big-endian
    records  seq (u64) | hash (32) | prev (32) | length of raw (u32) | raw      `count` times

where `raw` is the canonical envelope exactly as the log stored and hashed it. Its index,
`NNNNNN.meta.json`, names the range, the hash before the first entry and after the last, the Merkle
root over the segment's own entries, the SHA-256 and size of the compressed file, the envelopes'
time range (for queries), and the compact range of the whole archive after this segment (so the
root over everything archived needs no old segment to grow). The index is written after the
segment file: a segment file without an index is an unfinished seal and is ignored (and replaced).

Sealing recomputes the chain of what it reads from the live log and refuses to archive a break.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from charter.archive.layout import ArchiveError, Layout, read_json, write_json
from charter.archive.merkle import CompactRange, leaf_hash, root_of
from charter.bus.log.base import GENESIS, entry_hash
from charter.fsutil import write_private

MAGIC = b"CHSEG\x00v1"
HEADER = struct.Struct(">8sIQ")
RECORD = struct.Struct(">Q32s32sI")
META_VERSION = 1

Record = tuple[int, bytes, bytes, bytes]  # (seq, hash, prev, raw)


class SegmentError(ValueError):
    """A segment file or its index cannot be read."""


@dataclass
class SegmentMeta:
    segment: int
    first_seq: int
    last_seq: int
    count: int
    prev_hash: str  # hex: the chain hash before first_seq
    last_hash: str  # hex: the chain hash of last_seq
    root: str  # hex: MTH over this segment's leaves
    sha256: str  # hex digest of the .seg.zst file
    bytes: int  # size of the .seg.zst file
    raw_bytes: int  # size of the decompressed content
    first_ts: int  # smallest envelope ts (ms) in the segment
    last_ts: int  # largest envelope ts (ms)
    sealed_at: int  # ms
    frontier: list[str] = field(default_factory=list)  # compact range of the archive after this segment
    v: int = META_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: Any) -> SegmentMeta:
        if not isinstance(obj, dict):
            raise SegmentError("a segment index is a JSON object")
        try:
            meta = cls(**obj)
        except TypeError as exc:
            raise SegmentError(f"segment index fields: {exc}") from None
        ints = (meta.segment, meta.first_seq, meta.last_seq, meta.count, meta.bytes, meta.raw_bytes,
                meta.first_ts, meta.last_ts, meta.sealed_at, meta.v)
        if any(type(i) is not int for i in ints):
            raise SegmentError("segment index: numbers must be integers")
        for name in ("prev_hash", "last_hash", "root", "sha256"):
            value = getattr(meta, name)
            if not isinstance(value, str) or len(value) != 64:
                raise SegmentError(f"segment index: {name} must be 64 hex characters")
        if not isinstance(meta.frontier, list) or not all(isinstance(h, str) and len(h) == 64 for h in meta.frontier):
            raise SegmentError("segment index: frontier must be a list of hex hashes")
        if meta.count != meta.last_seq - meta.first_seq + 1 or meta.count < 1:
            raise SegmentError("segment index: count does not match its sequence range")
        return meta

    def compact_range(self) -> CompactRange:
        try:
            return CompactRange.from_hex(self.last_seq, self.frontier)
        except ValueError as exc:
            raise SegmentError(f"segment index: {exc}") from None


# -- encoding ----------------------------------------------------------------------------------


def encode(records: list[Record]) -> bytes:
    parts = [HEADER.pack(MAGIC, len(records), records[0][0] if records else 0)]
    pack = RECORD.pack
    for seq, h, prev, raw in records:
        parts.append(pack(seq, h, prev, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode(data: bytes) -> list[Record]:
    """The records of a decompressed segment; raises SegmentError on any malformation."""
    if len(data) < HEADER.size:
        raise SegmentError("segment is shorter than its header")
    magic, count, _first = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SegmentError("not a Charter segment (bad magic)")
    off, end = HEADER.size, len(data)
    unpack, size = RECORD.unpack_from, RECORD.size
    out: list[Record] = []
    append = out.append
    try:
        for _ in range(count):
            seq, h, prev, n = unpack(data, off)
            off += size
            if off + n > end:
                raise SegmentError(f"record for seq {seq} runs past the end of the segment")
            append((seq, h, prev, data[off:off + n]))
            off += n
    except struct.error:
        raise SegmentError("segment ends in the middle of a record") from None
    if off != end:
        raise SegmentError(f"{end - off} unexpected bytes after the last record")
    return out


def compress(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(data)


def decompress(blob: bytes) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 31)
    except zstandard.ZstdError as exc:
        raise SegmentError(f"cannot decompress: {exc}") from None


# -- reading -----------------------------------------------------------------------------------


def load_meta(path: Path) -> SegmentMeta:
    try:
        return SegmentMeta.from_dict(read_json(path))
    except (OSError, ValueError) as exc:
        if isinstance(exc, SegmentError):
            raise
        raise SegmentError(f"cannot read {path.name}: {exc}") from None


def committed(layout: Layout) -> list[SegmentMeta]:
    """Every segment whose index exists, in order. Raises SegmentError if one cannot be read."""
    return [load_meta(p) for _, p in layout.meta_files()]


def archive_head(layout: Layout) -> tuple[int, bytes, CompactRange, int]:
    """(last archived seq, its hash, the compact range, number of segments) from the last index."""
    metas = layout.meta_files()
    if not metas:
        return 0, GENESIS, CompactRange(), 0
    number, path = metas[-1]
    meta = load_meta(path)
    return meta.last_seq, bytes.fromhex(meta.last_hash), meta.compact_range(), number


def read_records(layout: Layout, meta: SegmentMeta) -> list[Record]:
    blob = layout.segment_path(meta.segment).read_bytes()
    return decode(decompress(blob))


def iter_records(layout: Layout, after_seq: int = 0, until_seq: int | None = None,
                 since_ts: int | None = None, until_ts: int | None = None) -> Iterator[Record]:
    """Archived entries with after_seq < seq <= until_seq, skipping segments outside a ts range."""
    for meta in committed(layout):
        if meta.last_seq <= after_seq:
            continue
        if until_seq is not None and meta.first_seq > until_seq:
            break
        if (since_ts is not None and meta.last_ts < since_ts) or (until_ts is not None and meta.first_ts > until_ts):
            continue
        for rec in read_records(layout, meta):
            if rec[0] <= after_seq:
                continue
            if until_seq is not None and rec[0] > until_seq:
                return
            yield rec


def find_record(layout: Layout, seq: int) -> Record | None:
    for meta in committed(layout):
        if meta.first_seq <= seq <= meta.last_seq:
            for rec in read_records(layout, meta):
                if rec[0] == seq:
                    return rec
    return None


# -- sealing -----------------------------------------------------------------------------------


def write_segment(layout: Layout, number: int, records: list[Record], ts: list[int], prev_hash: bytes,
                  frontier: CompactRange, level: int = 3) -> SegmentMeta:
    """Write one segment and then its index (both atomically); `frontier` is advanced in place."""
    leaves = [leaf_hash(r[1]) for r in records]
    for leaf in leaves:
        frontier.append(leaf)
    content = encode(records)
    blob = compress(content, level)
    meta = SegmentMeta(
        segment=number, first_seq=records[0][0], last_seq=records[-1][0], count=len(records),
        prev_hash=prev_hash.hex(), last_hash=records[-1][1].hex(), root=root_of(leaves).hex(),
        sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob), raw_bytes=len(content),
        first_ts=min(ts), last_ts=max(ts), sealed_at=time.time_ns() // 1_000_000,
        frontier=frontier.to_hex(),
    )
    write_private(layout.segment_path(number), blob)
    write_json(layout.meta_path(number), meta.to_dict())
    return meta


def _drop_unfinished(layout: Layout, last: int) -> None:
    for number, path in layout.segment_files():
        if number > last:
            path.unlink(missing_ok=True)


Row = tuple[int, bytes, bytes, bytes, int]  # (seq, hash, prev, raw, envelope ts): what sealing reads


def seal_rows(layout: Layout, rows: list[Row], level: int = 3) -> SegmentMeta:
    """Write `rows` as the next segment, after checking that they continue the archive's chain.

    The caller holds the archive lock. Raises ArchiveError (writing nothing) on a gap or a break.
    """
    seq, prev, frontier, number = archive_head(layout)
    _drop_unfinished(layout, number)
    records: list[Record] = []
    ts: list[int] = []
    expected = seq + 1
    for r_seq, h, p, raw, r_ts in rows:
        if r_seq != expected:
            raise ArchiveError(
                f"the live log has no entry {expected} (next is {r_seq}): it was removed before it was "
                "archived; nothing from there on was sealed. Run `charter archive verify`.")
        if p != prev or entry_hash(p, r_seq, raw) != h:
            raise ArchiveError(
                f"the live log's chain is broken at seq {r_seq}; nothing from there on was sealed. "
                "Run `charter archive verify`.")
        records.append((r_seq, h, p, raw))
        ts.append(r_ts)
        prev, expected = h, r_seq + 1
    return write_segment(layout, number + 1, records, ts, records[0][2], frontier, level)

"""Copy the archive to mirror directories (local disk, a NAS mount, a Syncthing folder).

- Incremental: a file the mirror's MANIFEST.json lists with the same size is not copied again.
- Resumable: each file is copied into `MIRROR/.partial/NAME.part` in chunks; an interrupted copy
  (a killed process, a full disk, an unplugged drive) leaves the part file, and the next sync goes
  on from its end once it has checked that the part is a prefix of the source. Only a complete file
  whose SHA-256 equals the source's is renamed into place.
- Ordered: identity first, then each segment file before its index, each checkpoint as soon as the
  segments it covers are there (see `plan`). A mirror cut off at any point is an older archive that
  verifies on its own.
- Append-only: a mirror never loses what it has. A segment or checkpoint that already exists in
  the mirror with different content is a conflict: it is reported, not overwritten (if the local
  archive was tampered with, the mirror keeps the good copy). `identity.json` is replaced only by
  a version whose certificates extend the mirror's.
- Verified: after the copy the mirror is verified on its own (`verify_archive(MIRROR)`), exactly as
  `charter archive verify --path MIRROR` would, and the result is recorded in its manifest.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from charter.archive.layout import Layout, read_json, write_json
from charter.archive.verify import verify_archive
from charter.fsutil import private_dir
from charter.identity.keys import PublicKey

CHUNK = 1 << 20
MANIFEST_EVERY = 64  # files between manifest writes during a long first copy

OnChunk = Callable[[str, int, int], None]  # (relative path, bytes written so far, size)


@dataclass
class SyncResult:
    mirror: str
    copied: list[str] = field(default_factory=list)
    copied_bytes: int = 0
    resumed_bytes: int = 0  # bytes an earlier, interrupted copy had already written
    skipped: int = 0
    conflicts: list[str] = field(default_factory=list)
    verified: bool | None = None
    first_bad_seq: int | None = None
    archived: int = 0  # entries the mirror holds (and verified), if it verified
    at: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.conflicts and self.error is None and self.verified is not False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while True:
            n = CHUNK if left is None else min(CHUNK, left)
            if n == 0:
                break
            block = f.read(n)
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def plan(layout: Layout) -> list[str]:
    """Relative paths to copy, in an order that keeps a partial mirror consistent at every point.

    A checkpoint covers whole segments (its tree size is a segment boundary) and its event on the
    bus comes after that boundary. So each checkpoint is copied once the segments it covers are, and
    before the next segment, the one that may hold its event: a mirror cut off anywhere never has a
    checkpoint claiming entries it lacks, nor the event of a checkpoint whose file it lacks.
    """
    out: list[str] = []
    if layout.identity_path.exists():
        out.append("identity.json")
    sizes: list[tuple[int, str]] = []
    for number, path in layout.checkpoint_files():
        try:
            size = read_json(path)["tree_size"]
            size = size if type(size) is int else 1 << 62
        except (OSError, ValueError, KeyError, TypeError):
            size = 1 << 62  # unreadable: last (the mirror's verification will say what it is)
        sizes.append((size, f"checkpoints/{path.name}"))
    pending = sorted(sizes)
    segs = dict(layout.segment_files())
    covered = 0
    for number, meta_path in layout.meta_files():
        while pending and pending[0][0] <= covered:
            out.append(pending.pop(0)[1])
        if number in segs:
            out.append(f"segments/{segs[number].name}")
        out.append(f"segments/{meta_path.name}")
        try:
            covered = read_json(meta_path)["last_seq"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    out += [name for _, name in pending]
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path, part: Path, rel: str, result: SyncResult, chunk: int, on_chunk: OnChunk | None,
          want_sha: str) -> None:
    size = src.stat().st_size
    offset = 0
    if part.exists():
        have = part.stat().st_size
        if have <= size and _sha256_file(part) == _sha256_file(src, have):
            offset = have
            result.resumed_bytes += have
        else:
            part.unlink()
    private_dir(part.parent)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with open(src, "rb") as f:
            f.seek(offset)
            done = offset
            while block := f.read(chunk):
                os.write(fd, block)
                done += len(block)
                result.copied_bytes += len(block)
                if on_chunk is not None:
                    on_chunk(rel, done, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if _sha256_file(part) != want_sha:
        part.unlink()
        raise OSError(f"{rel}: the copy does not match the source (changed while copying?); it will be copied again")
    private_dir(dst.parent)
    os.replace(part, dst)
    _fsync_dir(dst.parent)


def _certs(path: Path) -> list[Any] | None:
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return None
    certs = doc.get("certificates") if isinstance(doc, dict) else None
    return certs if isinstance(certs, list) else None


def sync_mirror(source: Path, mirror: Path, *, root: PublicKey | None = None, verify: bool = True,
                chunk: int = CHUNK, on_chunk: OnChunk | None = None) -> SyncResult:
    """Bring `mirror` up to date with the archive at `source`; see the module's docstring."""
    src = Layout(source)
    dst = Layout(mirror)
    result = SyncResult(str(mirror))
    try:
        private_dir(mirror)
    except OSError as exc:
        result.error = f"cannot create the mirror directory: {exc}"
        return result
    with dst.locked():
        try:
            manifest = read_json(dst.manifest_path)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError
        except (OSError, ValueError):
            manifest = {"v": 1, "files": {}}
        files: dict[str, Any] = manifest["files"]
        partial_dir = mirror / ".partial"
        pending_writes = 0
        for rel in plan(src):
            s_path, d_path = source / rel, mirror / rel
            s_size = s_path.stat().st_size
            known = files.get(rel)
            mutable = rel == "identity.json"
            if d_path.exists() and not mutable and known and known.get("bytes") == s_size == d_path.stat().st_size:
                result.skipped += 1
                continue
            s_sha = _sha256_file(s_path)
            if d_path.exists():
                d_sha = _sha256_file(d_path)
                if d_sha == s_sha:
                    files[rel] = {"sha256": s_sha, "bytes": s_size}
                    result.skipped += 1
                    continue
                if mutable:
                    mine, theirs = _certs(s_path), _certs(d_path)
                    if mine is None or theirs is None or mine[:len(theirs)] != theirs:
                        result.conflicts.append(f"{rel}: the mirror's certificates are not a prefix of the archive's")
                        continue
                else:
                    result.conflicts.append(f"{rel}: the mirror holds a different file; it was not overwritten "
                                            "(a mirror keeps what it has: remove that file there to copy it again)")
                    continue
            part = partial_dir / (rel.replace("/", "__") + ".part")
            try:
                _copy(s_path, d_path, part, rel, result, chunk, on_chunk, s_sha)
            except OSError as exc:
                result.error = str(exc)
                break
            files[rel] = {"sha256": s_sha, "bytes": s_size}
            result.copied.append(rel)
            pending_writes += 1
            if pending_writes >= MANIFEST_EVERY:
                write_json(dst.manifest_path, manifest)
                pending_writes = 0
        result.at = time.time()
        manifest["synced_at"] = result.at
        if verify and result.error is None:
            report = verify_archive(mirror, root=root)
            result.verified = report.ok
            result.first_bad_seq = report.first_bad
            result.archived = report.archived if report.ok else 0
            manifest["verified"] = {"ok": report.ok, "at": result.at, "archived": report.archived,
                                    "first_bad_seq": report.first_bad}
        write_json(dst.manifest_path, manifest)
        if partial_dir.exists() and not any(partial_dir.iterdir()):
            partial_dir.rmdir()
    return result

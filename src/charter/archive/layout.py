"""Where the archive's files live, and the small file helpers every module of the archive shares.

    archive/
      identity.json              root-signed certificates of the archivist's keys (newest last)
      segments/NNNNNN.seg.zst    sealed entries, zstd-compressed (see segments.py)
      segments/NNNNNN.meta.json  the segment's index: range, hashes, Merkle root, file digest
      checkpoints/NNNNNNNN.json  checkpoints signed by the archivist, each linked to the one before
      state.json                 the archivist's own bookkeeping (sync results); never trusted by verify
      MANIFEST.json              in a mirror: what was copied, with digests (written by sync)

A mirror has exactly the same layout, so `charter archive verify --path MIRROR` reads it unchanged.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from charter.fsutil import private_dir, write_private

SEGMENT_RE = re.compile(r"(\d{6,})\.seg\.zst")
META_RE = re.compile(r"(\d{6,})\.meta\.json")
CHECKPOINT_RE = re.compile(r"(\d{8,})\.json")


class ArchiveError(Exception):
    """The archive cannot do what was asked (and nothing was changed); the message says why."""


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    segments_dir = property(lambda self: self.root / "segments")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    identity_path = property(lambda self: self.root / "identity.json")
    state_path = property(lambda self: self.root / "state.json")
    manifest_path = property(lambda self: self.root / "MANIFEST.json")
    lock_path = property(lambda self: self.root / ".lock")

    def segment_path(self, number: int) -> Path:
        return self.segments_dir / f"{number:06d}.seg.zst"

    def meta_path(self, number: int) -> Path:
        return self.segments_dir / f"{number:06d}.meta.json"

    def checkpoint_path(self, number: int) -> Path:
        return self.checkpoints_dir / f"{number:08d}.json"

    def create(self) -> None:
        for d in (self.root, self.segments_dir, self.checkpoints_dir):
            private_dir(d)

    def numbered(self, directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), directory / name) for name in names if (m := pattern.fullmatch(name))]
        return sorted(found)

    def meta_files(self) -> list[tuple[int, Path]]:
        return self.numbered(self.segments_dir, META_RE)

    def segment_files(self) -> list[tuple[int, Path]]:
        return self.numbered(self.segments_dir, SEGMENT_RE)

    def checkpoint_files(self) -> list[tuple[int, Path]]:
        return self.numbered(self.checkpoints_dir, CHECKPOINT_RE)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold off writers (a seal, a prune, a sync into this directory) while a check reads the
        archive and then the live log: a seal and a prune in between would read as entries that
        exist nowhere. A shared lock: checks do not wait for one another. Nothing is created: an
        archive without a lock file (never written here) is read without one."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            yield
            return
        with _flocked(fd, fcntl.LOCK_SH):
            yield

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across processes (the daemon's archivist and a CLI command)."""
        self.create()
        with _flocked(os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600), fcntl.LOCK_EX):
            yield


@contextmanager
def _flocked(fd: int, mode: int) -> Iterator[None]:
    """`fd` locked in `mode` for the block, then unlocked and closed."""
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def write_json(path: Path, value: Any) -> None:
    """Atomically (temporary file, fsync, rename), mode 0600, indented for people."""
    write_private(path, orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")


def load_state(layout: Layout) -> dict[str, Any]:
    try:
        state = read_json(layout.state_path)
        return state if isinstance(state, dict) else {}
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def save_state(layout: Layout, state: dict[str, Any]) -> None:
    layout.create()
    write_json(layout.state_path, state)

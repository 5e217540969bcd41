"""Files written the safe way: private modes from the first byte, atomic replacement."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Write `data` to `path` atomically with `mode`; never briefly world-readable.

    With `exclusive`, refuse to replace an existing file (keys are never overwritten).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` (and parents) and make sure it has exactly `mode`."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path

"""An agent's sandbox directory (mode 0700) and the only door into it that Charter offers.

Paths are relative, walked one component at a time with O_NOFOLLOW from the sandbox's own file
descriptor: `..`, an absolute path or a symlink anywhere on the way is refused as `sandbox_escape`,
and a symlink swapped in mid-walk cannot redirect a write. Writes are held to the byte quota.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from charter.errors import NOT_FOUND, QUOTA_EXCEEDED, SANDBOX_ESCAPE, CharterError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PATH = 1024


def _escape(rel: str, why: str) -> CharterError:
    return CharterError(SANDBOX_ESCAPE, f"path {rel!r} {why}", "path")


def split_relative(rel: str) -> list[str]:
    """The components of a safe relative path; raises sandbox_escape for anything else."""
    if not isinstance(rel, str) or not rel or len(rel) > MAX_PATH:
        raise _escape(str(rel)[:80], "must be a non-empty relative path")
    if "\x00" in rel:
        raise _escape(rel, "contains a NUL byte")
    if rel.startswith("/") or rel.startswith("\\"):
        raise _escape(rel, "is absolute; sandbox paths are relative to the sandbox")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _escape(rel, "leaves the sandbox through '..'")
    if not parts:
        raise _escape(rel, "names the sandbox itself")
    return parts


class Sandbox:
    def __init__(self, root: Path, quota_bytes: int) -> None:
        self.root = root
        self.quota_bytes = quota_bytes

    def create(self) -> Sandbox:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        return self

    @contextmanager
    def _parent(self, parts: list[str], rel: str, *, create: bool) -> Iterator[int]:
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for name in parts[:-1]:
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise CharterError(NOT_FOUND, f"no such directory in the sandbox: {rel!r}", "path") from None
                    os.mkdir(name, 0o700, dir_fd=fd)
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _escape(rel, f"goes through {name!r}, which is a symlink or not a directory") from None
                    raise
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def usage(self) -> int:
        total = 0
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            for f in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def write(self, rel: str, data: bytes) -> int:
        """Write a file; returns the sandbox's usage afterwards. Refuses to exceed the quota."""
        parts = split_relative(rel)
        with self._parent(parts, rel, create=True) as dfd:
            name = parts[-1]
            old = 0
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _escape(rel, "is a symlink")
                if not stat.S_ISREG(st.st_mode):
                    raise _escape(rel, "is not a regular file")
                old = st.st_size
            except FileNotFoundError:
                pass
            used = self.usage()
            after = used - old + len(data)
            if after > self.quota_bytes:
                raise CharterError(
                    QUOTA_EXCEEDED,
                    f"writing {len(data)} bytes to {rel!r} would use {after} of the sandbox's {self.quota_bytes} bytes",
                    "path",
                )
            tmp = f".{name}.charter-tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return after

    def read(self, rel: str) -> bytes:
        parts = split_relative(rel)
        with self._parent(parts, rel, create=False) as dfd:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                raise CharterError(NOT_FOUND, f"no such file in the sandbox: {rel!r}", "path") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _escape(rel, "is a symlink") from None
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise _escape(rel, "is not a regular file")
                with os.fdopen(os.dup(fd), "rb") as fh:
                    return fh.read()
            finally:
                os.close(fd)

    def delete(self, rel: str) -> None:
        parts = split_relative(rel)
        with self._parent(parts, rel, create=False) as dfd:
            try:
                os.unlink(parts[-1], dir_fd=dfd)
            except FileNotFoundError:
                raise CharterError(NOT_FOUND, f"no such file in the sandbox: {rel!r}", "path") from None
            except IsADirectoryError:
                raise CharterError(NOT_FOUND, f"{rel!r} is a directory", "path") from None

    def list(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            for f in sorted(filenames):
                if f.endswith(".charter-tmp"):
                    continue
                full = os.path.join(dirpath, f)
                st = os.lstat(full)
                out.append({
                    "path": os.path.relpath(full, self.root),
                    "bytes": st.st_size,
                    "symlink": stat.S_ISLNK(st.st_mode),
                })
        return sorted(out, key=lambda e: str(e["path"]))

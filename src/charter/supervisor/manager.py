"""Processes Charter runs itself, as supervisord does: start, stop, restart, environment, working
directory, and their output captured into a log file that rotates by size.

Each process gets its own session (process group), so stop reaches its children too: SIGCONT (a
stopped process cannot handle SIGTERM), SIGTERM to the group, SIGKILL after `stop_timeout`. A pid
file in `run/services/LABEL.pid` records it; a process left behind by a daemon that was killed is
recognised by its pid and command line and stopped before a new one starts, so two copies never
fight over one port. When a process exits on its own, `on_exit(label, returncode)` is called at
once: the supervisor does not wait for the next check to notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from charter.supervisor.specs import ServiceConfig

log = logging.getLogger("charter.supervisor")
ExitHook = Callable[[str, int], Awaitable[None]]


class RotatingLog:
    """Append-only log file that rotates at `max_bytes`: LABEL.log -> LABEL.log.1 -> ... -> .N."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open for the process's life
        os.chmod(path, 0o600)
        self.size = self._fh.tell()

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if room <= 0:
                self.rotate()
                room = self.max_bytes
            piece, data = data[:room], data[room:]
            self._fh.write(piece)
            self.size += len(piece)

    def rotate(self) -> None:
        self._fh.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115
        os.chmod(self.path, 0o600)
        self.size = 0

    def note(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write(f"--- charter {stamp}: {text}\n".encode())

    def close(self) -> None:
        self._fh.close()


async def exited(proc: asyncio.subprocess.Process, timeout: float | None = None) -> int:
    """The exit code, as soon as the process is reaped.

    Not `proc.wait()` alone: on Python 3.11 it returns only once every pipe is closed too, and a child
    that outlived the process (holding its stdout) would hide the exit for as long as it lives.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            await asyncio.wait({waiter}, timeout=0.25 if left is None else min(left, 0.25))
    finally:
        if not waiter.done():
            waiter.cancel()
    return proc.returncode


class ManagedProcess:
    def __init__(self, spec: ServiceConfig, run_dir: Path, logs_dir: Path, *, log_max_bytes: int = 10 * 2**20,
                 log_backups: int = 3, on_exit: ExitHook | None = None, base_env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.label = spec.label
        self.pidfile = run_dir / f"{spec.label}.pid"
        self.log = RotatingLog(logs_dir / f"{spec.label}.log", log_max_bytes, log_backups)
        self.on_exit = on_exit
        self.base_env = base_env
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at: float | None = None
        self.starts = 0
        self.last_exit: int | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ if self.base_env is None else self.base_env)
        env.update(self.spec.env)
        env["CHARTER_SERVICE"] = self.label
        return env

    def _adopt_leftover(self) -> None:
        """A process from a daemon that died without stopping it: stop it if it is really ours."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            p = psutil.Process(pid)
            cmd = p.cmdline()
        except psutil.Error:
            self.pidfile.unlink(missing_ok=True)
            return
        argv = self.spec.command or []
        if cmd[-len(argv):] != argv and " ".join(argv) not in " ".join(cmd):
            self.pidfile.unlink(missing_ok=True)  # the pid was reused by something else
            return
        log.warning("stopping %s's leftover process %d from an earlier daemon", self.label, pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGCONT)
            os.killpg(pid, signal.SIGTERM)
        try:
            p.wait(self.spec.stop_timeout)
        except psutil.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        except psutil.Error:
            pass
        self.pidfile.unlink(missing_ok=True)

    async def start(self) -> int:
        async with self._lock:
            if self.alive():
                return self.proc.pid  # type: ignore[union-attr]
            await asyncio.to_thread(self._adopt_leftover)
            argv = self.spec.command
            assert argv is not None
            cwd = os.path.expanduser(self.spec.cwd) if self.spec.cwd else None
            self._stopping = False
            self.log.note(f"starting {' '.join(argv)}" + (f" in {cwd}" if cwd else ""))
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=cwd, env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                self.log.note(f"could not start: {exc}")
                raise
            self.proc = proc
            self.starts += 1
            self.started_at = time.time()
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text(f"{proc.pid}\n")
            for stream in (proc.stdout, proc.stderr):
                self._spawn(self._relay(stream))
            self._spawn(self._wait(proc))
            return proc.pid

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                return
            self.log.write(chunk)

    async def _wait(self, proc: asyncio.subprocess.Process) -> None:
        code = await exited(proc)
        # What is left of its process group (children that outlived it, maybe holding our pipes) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.last_exit = code
        if self.proc is proc:
            self.pidfile.unlink(missing_ok=True)
        how = f"signal {-code}" if code < 0 else f"code {code}"
        self.log.note(f"exited with {how}" + (" (stopped by Charter)" if self._stopping else ""))
        if not self._stopping and self.proc is proc and self.on_exit is not None:
            await self.on_exit(self.label, code)

    async def stop(self) -> int | None:
        """SIGCONT + SIGTERM to the process group; SIGKILL after stop_timeout. Returns the exit code."""
        async with self._lock:
            proc = self.proc
            if proc is None or proc.returncode is not None:
                return proc.returncode if proc else None
            self._stopping = True
            self.log.note("stopping (SIGTERM)")
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            try:
                await exited(proc, self.spec.stop_timeout)
            except TimeoutError:
                self.log.note(f"still running after {self.spec.stop_timeout:g}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await exited(proc)
            # the rest of the group (children that ignored SIGTERM) goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.pidfile.unlink(missing_ok=True)
            return proc.returncode

    async def restart(self) -> int:
        await self.stop()
        return await self.start()

    async def close(self) -> None:
        await self.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        self.log.close()

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "starts": self.starts, "started_at": self.started_at, "last_exit": self.last_exit,
                "log": str(self.log.path)}

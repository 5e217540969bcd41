"""A nats-server process of a test's own, on a spare loopback port (the binary is Debian's nats-server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def require_nats_server_binary() -> None:
    """Skip without the binary; fail under CI=true, where it must be installed."""
    if not os.path.exists(NATS_SERVER):
        msg = "the nats-server binary is not installed (Debian: apt-get install nats-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


class NatsServer:
    """`nats-server -c conf`; start/kill/restart keep the same port and store directory."""

    def __init__(self, workdir: Path, config: str = "", *, port: int | None = None,
                 whole_config: str | None = None) -> None:
        require_nats_server_binary()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.store = self.dir / "js"
        self.conf = self.dir / "nats.conf"
        self.extra = config
        self.proc: subprocess.Popen[bytes] | None = None
        if whole_config is None:
            self.write_config()
        else:
            self.conf.write_text(whole_config)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{self.store}" }}\n'
            f"{self.extra}\n"
        )

    def start(self, timeout: float = 10.0) -> NatsServer:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - kept by the process
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start listening")

    def kill(self) -> None:
        """SIGKILL: no shutdown of its own."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

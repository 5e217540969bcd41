"""`charter up`: serve a Node on 127.0.0.1 with uvicorn (uvloop + httptools).

The daemon writes `run/daemon.json` (pid and URL) once it is listening, and removes it on a clean
exit; `charter status` and `charter down` read it. A stale file from a killed daemon is detected
by its pid and ignored.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import uvicorn

from charter.config import Home
from charter.server.daemon_file import dashboard_token, read_daemon_file  # noqa: F401 - the daemon's own record
from charter.fsutil import write_private
from charter.logs import setup_logging
from charter.server.http_protocol import AbortableHttpToolsProtocol


class _Server(uvicorn.Server):
    """uvicorn's server, telling the world where it listens once the socket is bound."""

    def __init__(self, config: uvicorn.Config, home: Home, url: str, log_format: str = "text") -> None:
        super().__init__(config)
        self.home, self.url, self.log_format = home, url, log_format

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            settle_heap()
            info = {"pid": os.getpid(), "url": self.url, "started_at": time.time()}
            write_private(self.home.daemon_file, json.dumps(info).encode())
            token = dashboard_token(self.home)
            if token and self.log_format == "json":  # every line a JSON object, this one too
                logging.getLogger("charter.daemon").info(
                    "Charter is up at %s (pid %d)", self.url, os.getpid(),
                    extra={"fields": {"url": self.url, "pid": os.getpid(), "dashboard": f"{self.url}/dashboard#token={token}"}})
            elif token:
                print(f"Charter is up at {self.url} (pid {os.getpid()}).", flush=True)
                print(f"Dashboard: {self.url}/dashboard#token={token}", flush=True)


def settle_heap() -> None:
    """Tune the runtime for latency once started: the start-up heap frozen, a shorter GIL slice.

    The daemon starts with ~100k long-lived objects (FastAPI's routes, pydantic models, the
    registry, compiled policies). Every full collection walks them all, 70-90 ms on these machines,
    and the event loop, with every publish and model call in flight, waits for it: that was the p99
    of a single publish. Frozen objects are never scanned again (they never become garbage anyway),
    so a full collection only walks what was allocated since.
    """
    gc.collect()
    gc.freeze()
    # Worker threads busy in Python (a prune, a capsule build; a seal on a NATS log) keep the GIL
    # for the whole switch interval (5 ms by default) each time the event loop wants it back,
    # several times per request. 1 ms keeps a publish's tail short meanwhile.
    sys.setswitchinterval(0.001)


def serve(home: Home, host: str | None = None, port: int | None = None) -> int:
    """Run the daemon in the foreground until SIGINT or SIGTERM. Returns the exit code."""
    from charter.node import Node
    from charter.server.app import create_app

    config = home.load_config()
    setup_logging(config.daemon.log_format)
    running = read_daemon_file(home)
    if running:
        logging.getLogger("charter.daemon").error("a daemon is already running (pid %s, %s)", running["pid"], running["url"])
        return 3
    node = Node(home, config)
    host = host or config.daemon.host
    port = port if port is not None else config.daemon.port
    url = f"http://{host}:{port}"
    json_logs = {"log_config": None} if config.daemon.log_format == "json" else {}  # then setup_logging formats uvicorn's too
    uv = uvicorn.Config(
        create_app(node), host=host, port=port, loop="uvloop", http=AbortableHttpToolsProtocol,
        access_log=False, log_level="warning", lifespan="on", timeout_graceful_shutdown=3,
        # Longer than the clients' pools keep idle connections (the SDK: 30 s), so that the client,
        # not the daemon, closes an idle one; uvicorn's default of 5 s races every agent's next call.
        timeout_keep_alive=75,
        # No proxy in front of Charter is trusted to rename its callers (uvicorn trusts one on
        # 127.0.0.1 by default, which here means any local process): and one layer less per request.
        proxy_headers=False, **json_logs,
    )
    server = _Server(uv, home, url, config.daemon.log_format)
    try:
        server.run()
    finally:
        try:
            info = json.loads(home.daemon_file.read_text())
            if info.get("pid") == os.getpid():
                home.daemon_file.unlink()
        except (FileNotFoundError, ValueError):
            pass
    return 0 if server.started else 1


def spawn(home: Home, *, port: int | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """Start the daemon in the background, wait until it answers, and return its record."""
    home.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "charter", "--home", str(home.root), "up"]
    if port is not None:
        cmd += ["--port", str(port)]
    logf = open(home.log_file, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(home.log_file).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the daemon exited with code {proc.returncode}:\n{tail}")
        info = read_daemon_file(home)
        if info and info.get("pid") == proc.pid:
            return info
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the daemon did not start within {timeout:g}s; see {home.log_file}")


def stop(home: Home, timeout: float = 10.0) -> bool:
    """SIGTERM the running daemon and wait for it; False if none was running."""
    info = read_daemon_file(home)
    if not info:
        return False
    pid = info["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
    return True

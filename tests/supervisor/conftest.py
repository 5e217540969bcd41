"""Fixtures for the supervisor: a Node with services on a fresh home, real processes and ports.

Nothing is mocked: services are `tests/supervisor/svc.py` HTTP servers (or stand-in Ollamas) run as
processes, checks open real sockets, and events are read back from the node's bus log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from charter.config import Home
from charter.node import Node
from tests.conftest import free_port, make_home

PY = sys.executable
SVC = str(Path(__file__).with_name("svc.py"))


def toml_list(argv: list[str]) -> str:
    return json.dumps(argv)


def write_services(home: Home, text: str) -> None:
    home.config_path.write_text(home.config_path.read_text() + "\n" + text)


async def wait_until(pred: Callable[[], Any], timeout: float = 10.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


async def events(node: Node, prefix: str = "charter.services.") -> list[dict[str, Any]]:
    """Every envelope on the bus under `prefix`, oldest first (seq, subject, payload, sender).

    The supervisor's pending events are flushed first: a state is visible in memory a moment before
    its event is on the bus (the API flushes the same way before it answers)."""
    await node.supervisor.flush()
    out = []
    after = 0
    while True:
        batch = await node.log.read(after, 1000)
        if not batch:
            return out
        for e in batch:
            after = e.seq
            if e.subject.startswith(prefix):
                env = json.loads(e.raw)
                out.append({"seq": e.seq, "subject": e.subject, "payload": env["payload"], "sender": env["sender"],
                            "ts": env["ts"]})


def kill9(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Started:
    """Processes a test starts itself (not through the supervisor); all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def svc(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([PY, SVC, "--port", str(port), *args], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            kill9(p.pid)
            p.wait(5)


def wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


def kill_leftovers(marker: str) -> None:
    """Processes started by a detached restart command are nobody's children: find them by marker."""
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info.get("cmdline") or []):
            kill9(p.pid)


@pytest.fixture
def started() -> Iterator[Started]:
    s = Started()
    yield s
    s.close()


@pytest.fixture
def sup_home(tmp_path: Path) -> Home:
    return make_home(tmp_path / "home")


@pytest.fixture
async def node_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """`await node_factory(services_toml)`: a started Node on a fresh home with those services."""
    nodes: list[Node] = []

    async def make(text: str, home: Home | None = None) -> Node:
        h = home or make_home(tmp_path / f"home{len(nodes)}")
        write_services(h, text)
        node = Node(h)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        await n.close()


__all__ = ["PY", "SVC", "Started", "events", "free_port", "kill9", "kill_leftovers", "toml_list", "wait_port",
           "wait_until", "write_services"]


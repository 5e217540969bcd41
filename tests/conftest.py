"""Shared fixtures: a fresh CHARTER_HOME, a real daemon process on a spare loopback port, enrolled agents.

Nothing here is mocked: the daemon is `python -m charter up`, reached over real sockets.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from charter.cli.operator import OperatorClient
from charter.config import Home
from charter.identity.init import init_home
from charter.sdk import Agent
from charter.server.daemon import spawn, stop

# Property tests check correctness, not speed: no per-example deadline, which a busy CI host
# (three workers, daemons and a browser beside them) misses now and then for no fault of the code.
settings.register_profile("charter", deadline=None)
settings.load_profile("charter")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


PORT_SPAN = 12_000  # how many ports below the ephemeral range free_port draws from
_handed_out: set[int] = set()  # by this process: two picks before either is bound must differ
_draw = random.SystemRandom()  # not the global generator, which a test may seed


def _worker_slice(first: int, end: int) -> tuple[int, int]:
    """This pytest-xdist worker's own share of [first, end): workers never draw the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    if count <= 1 or index >= count:
        return first, end
    size = (end - first) // count
    return first + index * size, first + (index + 1) * size


def free_port() -> int:
    """A loopback port that is free now and that nothing else is likely to take before it is used.

    Binding port 0 would hand out one from the kernel's ephemeral range, and so might the next
    outgoing connection of any process (another test worker's clients, say) in the seconds before
    the daemon or server written against it binds it. A port just below that range is never handed
    out by the kernel; each test worker draws from its own share of them, and never twice.
    """
    low = _ephemeral_low()
    first, end = _worker_slice(max(1024, low - PORT_SPAN), low)
    for _ in range(200) if end - first >= 500 else ():
        port = _draw.randrange(first, end)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: draw again
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # an unusual port range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_home(root: Path, **bus: Any) -> Home:
    home = Home(root)
    init_home(home)
    text = home.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {free_port()}", text)
    for key, value in bus.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    home.config_path.write_text(text)
    return home


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path / "home")


class Daemon:
    """A running `charter up` for one test (or one module)."""

    def __init__(self, home: Home, info: dict[str, Any]) -> None:
        self.home, self.info, self.url = home, info, info["url"]
        self.pid: int = info["pid"]
        self._n = 0

    def operator(self) -> OperatorClient:
        return OperatorClient(self.home)

    async def invite(self, role: str = "worker", **kw: Any) -> str:
        async with self.operator() as op:
            answer = await op.call("POST", "/v1/admin/invites", json={"role": role, **kw})
        return answer["token"]

    async def enroll(self, name: str | None = None, role: str = "worker", creds_dir: Path | None = None) -> Agent:
        self._n += 1
        name = name or f"agent{self._n}"
        token = await self.invite(role)
        path = (creds_dir or self.home.root.parent) / f"{name}.creds.json"
        return await Agent.enroll(self.url, token, name, path)

    async def admin(self, method: str, path: str, **kw: Any) -> Any:
        async with self.operator() as op:
            return await op.call(method, path, **kw)


def start_daemon(home: Home) -> Daemon:
    return Daemon(home, spawn(home))


@pytest.fixture
def daemon(home: Home) -> Iterator[Daemon]:
    d = start_daemon(home)
    yield d
    stop(home)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for a whole module whose tests don't disturb each other."""
    home = make_home(tmp_path_factory.mktemp("shared") / "home")
    d = start_daemon(home)
    yield d
    stop(home)


def require_ci_service(name: str, host: str, port: int) -> None:
    """Skip when a server is absent outside CI; fail under CI=true, where it must be running."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        msg = f"{name} is not running on {host}:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI must start it)")
        pytest.skip(msg)


PG_BASE_DSN = "host=127.0.0.1 port=5432 dbname=test"


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A DSN for a fresh schema of its own on the PostgreSQL at 127.0.0.1:5432, dropped afterwards."""
    require_ci_service("PostgreSQL", "127.0.0.1", 5432)
    import uuid

    psycopg = pytest.importorskip("psycopg")
    schema = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(PG_BASE_DSN, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG_BASE_DSN} options=-csearch_path={schema}"
    with psycopg.connect(PG_BASE_DSN, autocommit=True) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")


async def aclose(*agents: Agent) -> None:
    for a in agents:
        await a.close()


@pytest.fixture
async def agents(daemon: Daemon) -> AsyncIterator[dict[str, Agent]]:
    """Two agents of different roles: `worker` (alpha) and `observer` (owl)."""
    alpha = await daemon.enroll("alpha", "worker")
    owl = await daemon.enroll("owl", "observer")
    yield {"alpha": alpha, "owl": owl}
    await aclose(alpha, owl)

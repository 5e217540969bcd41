"""Backends for the EventLog contract suite.

Each backend is one factory in BACKENDS. A factory gets a fresh temporary directory and returns a
`Backend`: how to open an instance of the log on one storage (called again to reopen it, or to open a
second instance side by side), and what the backend can do beyond the protocol (`capabilities`).
Tests that need a capability declare it with `@pytest.mark.requires("...")` and are skipped for
backends that lack it; every other test must pass, unchanged, for every backend.

Capabilities in use:
  shared_storage  two open instances on one storage append to one chain (SQLite: one file, many
                  connections or processes). A networked backend reached by every instance has it too.
  sqlite_file     the storage is a Charter SQLite database at `Backend.path`, which tests may edit
                  with sqlite3 directly and check with `verify_file`.

The `nats` backend runs against the JetStream server on 127.0.0.1:4222 (skipped when it is absent,
failed under CI=true), on a stream of its own per test, deleted at teardown.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from charter.bus.log.base import EventLog
from charter.bus.log.sqlite import SqliteLog

from conftest import require_ci_service


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable[EventLog]]
    capabilities: frozenset[str] = frozenset()
    path: Path | None = None  # the storage's file, for backends that have one
    opened: list[EventLog] = field(default_factory=list)
    cleanup: Callable[[], Awaitable[None]] | None = None  # removes the storage at teardown (networked backends)

    async def instance(self) -> EventLog:
        """Open another instance on the same storage; closed at teardown if still open."""
        log = await self.open()
        self.opened.append(log)
        return log


def sqlite_backend(tmp: Path) -> Backend:
    path = tmp / "charter.db"

    async def open_() -> EventLog:
        return SqliteLog(path)

    return Backend("sqlite", open_, frozenset({"shared_storage", "sqlite_file"}), path)


NATS_HOST, NATS_PORT = "127.0.0.1", 4222


def nats_backend(tmp: Path) -> Backend:
    require_ci_service("NATS", NATS_HOST, NATS_PORT)
    from charter.bus.log.nats import NatsLog

    stream = "T" + uuid.uuid4().hex[:20].upper()  # a stream (and consumer bucket) of its own per test
    url = f"nats://{NATS_HOST}:{NATS_PORT}"

    async def open_() -> EventLog:
        return await NatsLog(url, stream, poll=0.2).open()

    async def cleanup() -> None:
        log = NatsLog(url, stream)
        try:
            await log.delete_storage()
        finally:
            await log.close()

    return Backend("nats", open_, frozenset({"shared_storage"}), cleanup=cleanup)


# name -> factory. A new backend adds one entry here and nothing else.
BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "sqlite": sqlite_backend,
    "nats": nats_backend,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*capabilities): skip for log backends without them")


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    b = BACKENDS[request.param](tmp_path)
    marker = request.node.get_closest_marker("requires")
    missing = set(marker.args if marker else ()) - b.capabilities
    if missing:
        pytest.skip(f"the {b.name} backend lacks {', '.join(sorted(missing))}")
    return b


async def _close_quietly(log: EventLog) -> None:
    try:
        await log.close()
    except Exception:  # noqa: BLE001 - already closed by the test is fine
        pass


@pytest.fixture
async def log(backend: Backend) -> AsyncIterator[EventLog]:
    """A fresh, empty log on the backend under test."""
    first = await backend.instance()
    yield first
    for instance in backend.opened:
        await _close_quietly(instance)
    if backend.cleanup is not None:
        await backend.cleanup()

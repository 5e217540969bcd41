from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from charter.bus.log.nats import NatsLog
from conftest import require_ci_service

SHARED_URL = "nats://127.0.0.1:4222"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def shared_nats() -> str:
    """The JetStream server every machine of this project runs on 127.0.0.1:4222 (CI too)."""
    require_ci_service("NATS", "127.0.0.1", 4222)
    return SHARED_URL


@pytest.fixture
async def nats_logs(shared_nats: str) -> AsyncIterator[Callable[..., Any]]:
    """Open NatsLog instances on one fresh stream; the stream is deleted at teardown."""
    stream = "T" + uuid.uuid4().hex[:20].upper()
    opened: list[NatsLog] = []

    async def make(**kw: Any) -> NatsLog:
        log = await NatsLog(shared_nats, stream, **kw).open()
        opened.append(log)
        return log

    make.stream = stream  # type: ignore[attr-defined]
    yield make
    for log in opened:
        await log.close()
    cleanup = NatsLog(shared_nats, stream)
    await cleanup.delete_storage()
    await cleanup.close()

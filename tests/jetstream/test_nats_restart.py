"""A NATS server killed (SIGKILL) and restarted while Charter publishes: no acknowledged event is
lost, none is stored twice, and the chain verifies. The test runs its own nats-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from charter.bus.envelope import seal
from charter.bus.log.base import GENESIS, entry_hash
from charter.bus.log.nats import NatsLog
from charter.identity.keys import SigningKey

from .support import NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
KEY = SigningKey.generate()


async def test_server_killed_and_restarted_during_publishing(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    log = await NatsLog(server.url, "RESTART", request_timeout=0.5, append_timeout=30.0).open()
    acked: list[tuple[int, str, str]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()
    n = 0

    async def publisher(k: int) -> None:
        nonlocal n
        while not stop.is_set():
            n += 1
            batch = [seal(KEY, sender="agt_restart", subject=f"agents.p{k}.n", payload={"n": n, "i": i})
                     for i in range(1 + n % 3)]
            try:
                receipts = await log.append(batch)
            except Exception as exc:  # noqa: BLE001 - counted and asserted on below
                failures.append(exc)
                continue
            for r, e in zip(receipts, batch, strict=True):
                assert r.id == e.id
                acked.append((r.seq, r.id, r.hash))

    tasks = [asyncio.create_task(publisher(k)) for k in range(3)]
    try:
        await asyncio.sleep(0.6)
        before_kill = len(acked)
        server.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(1.0)
        during_outage = len(acked) - before_kill
        server.start()
        while len(acked) < before_kill + during_outage + 50 and time.monotonic() - killed_at < 20:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    try:
        assert before_kill > 20, "publishing had not got going before the kill"
        assert len(acked) > before_kill + 20, "publishing did not resume after the restart"
        assert not failures, failures[:3]

        reader = await NatsLog(server.url, "RESTART").open()  # a fresh instance reads what the server kept
        entries = []
        while batch := await reader.read(entries[-1].seq if entries else 0, 500):
            entries += batch
        prev = GENESIS
        for i, e in enumerate(entries, start=1):
            assert (e.seq, e.prev, e.hash) == (i, prev, entry_hash(prev, i, e.raw))
            prev = e.hash
        stored = {(e.seq, e.id, e.hash.hex()) for e in entries}
        assert set(acked) <= stored, "an acknowledged entry is missing after the restart"
        assert len({e.id for e in entries}) == len(entries), "an entry was stored twice"
        assert len(entries) == len(acked), "the log holds entries nobody got a receipt for"
        report = await reader.verify()
        assert report.ok and report.checked == len(entries)
        await reader.close()
    finally:
        await log.close()
        server.stop()

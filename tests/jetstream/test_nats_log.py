"""The NATS JetStream log beyond the contract suite: contention, group commit, limits, foreign messages.

Runs against the JetStream server on 127.0.0.1:4222 (skipped without it, failed under CI=true), each
test on a stream of its own.
"""

from __future__ import annotations

import asyncio

import pytest

from charter.bus.envelope import seal
from charter.bus.log.base import GENESIS, DuplicateIds, entry_hash
from charter.bus.log.nats import NatsLog, decode_message
from charter.errors import TOO_LARGE, CharterError
from charter.identity.keys import SigningKey

pytestmark = pytest.mark.anyio
KEY = SigningKey.generate()


def env(n: int, *, eid: str | None = None, size: int = 0, sender: str = "agt_nats"):
    return seal(KEY, sender=sender, subject=f"agents.nats.n{n % 5}", payload={"n": n, "pad": "x" * size}, eid=eid)


async def entries(log: NatsLog):
    out = []
    while batch := await log.read(out[-1].seq if out else 0, 500):
        out += batch
    return out


def one_chain(es) -> None:
    prev = GENESIS
    for i, e in enumerate(es, start=1):
        assert e.seq == i and e.prev == prev and e.hash == entry_hash(prev, i, e.raw)
        prev = e.hash


async def test_two_writers_racing_build_one_chain(nats_logs) -> None:
    """Two instances (as two daemons would) append concurrently: expected-last-sequence makes them
    take turns, each retry recomputing prev and seq; nothing forks, nothing is lost or doubled."""
    a, b = await nats_logs(), await nats_logs()
    receipts: dict[str, list] = {"a": [], "b": []}

    async def writer(name: str, log: NatsLog, start: int) -> None:
        for i in range(60):
            batch = [env(start + i * 3 + k) for k in range(1 + i % 3)]
            receipts[name] += [(r, e) for r, e in zip(await log.append(batch), batch, strict=True)]

    await asyncio.gather(*(writer("a", a, 0), writer("a", a, 10_000), writer("b", b, 20_000),
                           writer("b", b, 30_000)))
    got = await entries(a)
    one_chain(got)
    all_receipts = receipts["a"] + receipts["b"]
    assert len(got) == len(all_receipts) == len({e.id for e in got})
    by_seq = {e.seq: e for e in got}
    for r, e in all_receipts:
        assert by_seq[r.seq].id == e.id and by_seq[r.seq].hash.hex() == r.hash
    assert await a.head() == await b.head()
    assert (await b.verify()).ok


async def test_concurrent_appends_in_one_instance_are_grouped_and_keep_their_own_receipts(nats_logs) -> None:
    log = await nats_logs()
    first = env(0)
    await log.append([first])
    batches = [[env(i * 10 + k) for k in range(1 + i % 4)] for i in range(1, 80)]
    batches.append([env(999, eid=first.id)])  # already in the log
    clash = env(5000)
    batches += [[clash], [env(5001, eid=clash.id)]]  # two calls in flight with one id: one of them loses
    results = await asyncio.gather(*(log.append(b) for b in batches), return_exceptions=True)
    dup_results = [r for r in results if isinstance(r, DuplicateIds)]
    assert len(dup_results) == 2 and all(d.positions == {0} for d in dup_results)
    got = await entries(log)
    one_chain(got)
    ok = [(b, r) for b, r in zip(batches, results, strict=True) if not isinstance(r, BaseException)]
    assert len(got) == 1 + sum(len(b) for b, _ in ok)
    by_seq = {e.seq: e for e in got}
    for batch, receipts in ok:
        seqs = [r.seq for r in receipts]
        assert seqs == list(range(seqs[0], seqs[0] + len(batch)))  # a call's entries stay together, in order
        assert [by_seq[s].id for s in seqs] == [e.id for e in batch]
    stream_last = (await log._js.stream_info(log.stream)).state.last_seq  # noqa: SLF001
    assert stream_last < len(ok) + 1, "concurrent appends should share messages (group commit)"


async def test_a_batch_larger_than_max_payload_is_refused_whole(nats_logs) -> None:
    log = await nats_logs()
    await log.append([env(1)])
    head = await log.head()
    big = [env(i, size=60_000) for i in range(40)]  # ~2.4 MB: over the default 1 MiB max_payload
    with pytest.raises(CharterError) as info:
        await log.append(big)
    assert info.value.code == TOO_LARGE
    assert await log.head() == head
    assert [e.seq for e in await log.read(0)] == [1]
    receipts = await log.append(big[:10])  # a batch that fits goes through as one message
    assert [r.seq for r in receipts] == list(range(2, 12))


async def test_a_foreign_message_on_the_log_subject_is_not_part_of_the_chain(nats_logs) -> None:
    """Anything published on the log's subject that does not link (garbage, a stale writer's message
    built on an old head) is skipped by every instance alike, and named by verify()."""
    log = await nats_logs()
    await log.append([env(1), env(2)])
    await log._js.publish(log.subject, b"not a log message")  # noqa: SLF001 - as a rogue client would
    stale = await nats_logs()
    (r3,) = await stale.append([env(3)])
    assert r3.seq == 3  # built on seq 2, past the foreign message
    got = await entries(log)
    one_chain(got)
    assert [e.seq for e in got] == [1, 2, 3]
    report = await log.verify()
    assert not report.ok and "not a log message" in report.breaks[0].reason
    assert report.checked == 3


async def test_reopening_rebuilds_the_index_from_the_stream(nats_logs) -> None:
    log = await nats_logs(cache_entries=5)  # a tiny cache: reads go back to the server
    ids = []
    for i in range(0, 300, 3):
        batch = [env(i), env(i + 1), env(i + 2)]
        ids += [e.id for e in batch]
        await log.append(batch)
    again = await nats_logs(cache_entries=5)
    got = await entries(again)
    assert [e.id for e in got] == ids
    one_chain(got)
    assert (await again.get(150)).id == ids[149]  # type: ignore[union-attr]
    with pytest.raises(DuplicateIds):
        await again.append([env(0, eid=ids[7])])
    assert [e.seq for e in await again.read(295, 10)] == [296, 297, 298, 299, 300]


async def test_message_format_round_trips(nats_logs) -> None:
    log = await nats_logs()
    batch = [env(1), env(2), env(3)]
    receipts = await log.append(batch)
    msg = await log._js.get_msg(log.stream, seq=1)  # noqa: SLF001
    d = decode_message(msg.data)
    assert d.first == 1 and d.prev == GENESIS
    assert [raw for _, raw in d.items] == [e.raw for e in batch]
    assert [h.hex() for h, _ in d.items] == [r.hash for r in receipts]
    assert msg.headers and msg.headers.get("Nats-Msg-Id") == d.token.hex()


async def test_an_existing_stream_that_could_lose_entries_is_refused(shared_nats) -> None:
    import uuid

    import nats
    from nats.js.api import StreamConfig

    name = "T" + uuid.uuid4().hex[:20].upper()
    nc = await nats.connect(shared_nats)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"_charter.{name}.log"], max_age=3600))
    try:
        with pytest.raises(CharterError) as info:
            await NatsLog(shared_nats, name).open()
        assert info.value.code == "conflict"
        assert "deleting or purging" in info.value.message and "drop old entries" in info.value.message
    finally:
        await js.delete_stream(name)
        await nc.close()


async def test_an_unreachable_server_is_a_clear_error() -> None:
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    log = NatsLog(f"nats://127.0.0.1:{port}", "NOWHERE")
    with pytest.raises(CharterError) as info:
        await log.head()
    assert info.value.code == "log_unavailable" and str(port) in info.value.message
    assert time.monotonic() - t0 < 10

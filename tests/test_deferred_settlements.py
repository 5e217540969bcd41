"""Model calls' settlements, booked a turn of the loop after their answers (`DeferredSettlements`):
together in one transaction, each on its own, never lost on a clean shutdown, and a settlement
that cannot be booked is told to the operator rather than raised into an answer sent already. A
reservation whose alert cannot be published is given back before any call goes upstream."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from charter.budget.deferred import DeferredSettlements
from charter.budget.ledger import Ledger, Limit
from charter.identity.registry import AgentRecord
from charter.bus.log.sqlite import SqliteLog
from charter.encoding import loads
from charter.node import Node
from tests.conftest import make_home

pytestmark = pytest.mark.anyio

LIMITS = [Limit("global", "usd", "day", 1_000_000)]


class Who:
    """The part of an AgentRecord the queue reads."""

    def __init__(self, agent_id: str, name: str) -> None:
        self.id, self.name = agent_id, name


AGENT: Any = Who("agt_a", "alice")


def held(ledger: Ledger, n: int, usd: int = 1000) -> list[str]:
    return [ledger.reserve(agent_id=AGENT.id, role="w", usd=usd, tokens=100, limits=LIMITS).id for _ in range(n)]


def use(ledger: Ledger) -> tuple[int, int]:
    row = ledger.usage(LIMITS)[0]
    return row["reserved"], row["committed"]


class Published:
    def __init__(self) -> None:
        self.alerts: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, agent: AgentRecord, alerts: list[dict[str, Any]]) -> None:
        self.alerts += [(agent.name, a) for a in alerts]


async def test_settlements_are_booked_together_a_slice_per_turn_of_the_loop(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "c.db")
    commits: list[str] = []
    ledger._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    queue = DeferredSettlements(ledger, Published())
    try:
        rids = held(ledger, 20)
        commits.clear()
        for i, rid in enumerate(rids):
            queue.add(AGENT, rid, usd=100 + i, tokens_in=5, tokens_out=5)
        assert use(ledger) == (20_000, 0) and len(queue) == 20  # held at the full amount until booked
        await asyncio.sleep(0)  # one turn of the loop: the first slice
        assert queue.max_batch == 8
        assert use(ledger) == (12_000, sum(100 + i for i in range(8))) and commits == ["COMMIT"]
        for _ in range(2):
            await asyncio.sleep(0)  # a slice per turn: the loop is free in between
        assert use(ledger) == (0, sum(100 + i for i in range(20)))
        assert commits == ["COMMIT"] * 3  # three transactions for the twenty
        assert (queue.booked, queue.failed, len(queue)) == (20, 0, 0)
    finally:
        ledger.close()


async def test_one_that_cannot_be_booked_is_logged_and_the_others_are_booked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(tmp_path / "c.db")
    queue = DeferredSettlements(ledger, Published())
    try:
        a, b = held(ledger, 2)
        ledger.release(b)
        (c,) = held(ledger, 1)
        with caplog.at_level(logging.ERROR, logger="charter.budget"):
            queue.add(AGENT, a, usd=300, tokens_in=1, tokens_out=1)
            queue.add(AGENT, b, usd=300, tokens_in=1, tokens_out=1)  # released already
            queue.add(AGENT, c, usd=2**63, tokens_in=0, tokens_out=0)  # more than SQLite can hold
            queue.add(AGENT, "res_nope", usd=1, tokens_in=0, tokens_out=0)
            await asyncio.sleep(0)
        assert use(ledger) == (1000, 300)  # c still held, for the sweeper
        assert (queue.booked, queue.failed) == (1, 3)
        said = [r.getMessage() for r in caplog.records if r.name == "charter.budget"]
        assert len(said) == 3
        assert b in said[0] and "alice" in said[0] and "already released" in said[0]
        assert c in said[1] and "OverflowError" in said[1]
        assert "res_nope" in said[2]
    finally:
        ledger.close()


async def test_a_database_failure_is_logged_for_each_and_raised_into_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(tmp_path / "c.db")
    queue = DeferredSettlements(ledger, Published())
    rids = held(ledger, 3)
    ledger.close()  # every statement now fails
    with caplog.at_level(logging.ERROR, logger="charter.budget"):
        for rid in rids:
            queue.add(AGENT, rid, usd=1, tokens_in=0, tokens_out=0)
        await asyncio.sleep(0)
    assert (queue.booked, queue.failed) == (0, 3)
    assert sorted(rid for rid in rids for r in caplog.records if rid in r.getMessage()) == sorted(rids)


async def test_an_overrun_is_published_once_booked(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "c.db")
    published = Published()
    queue = DeferredSettlements(ledger, published)
    try:
        (rid,) = held(ledger, 1, usd=1000)
        queue.add(AGENT, rid, usd=2500, tokens_in=1, tokens_out=1)  # the backend outgrew the reservation
        assert published.alerts == []
        await queue.drain()
        ((who, alert),) = published.alerts
        assert who == "alice" and alert["kind"] == "overrun" and alert["usd"] == 2500
        assert use(ledger) == (0, 2500)
    finally:
        ledger.close()


async def test_a_clean_shutdown_books_what_is_queued(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    node = Node(home)
    rid = node.gov.ledger.reserve(agent_id=AGENT.id, role="w", usd=5000, tokens=10, limits=LIMITS).id
    node.gov.settlements.add(AGENT, rid, usd=1234, tokens_in=2, tokens_out=3)
    await node.close()  # at once: no turn of the loop has passed
    ledger = Ledger(home.budget_db_path)
    try:
        assert use(ledger) == (0, 1234)
        assert ledger.history(by="agent")[0]["usd_micros"] == 1234
    finally:
        ledger.close()


def test_booked_outside_the_loop_an_alert_is_logged_not_lost_in_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`Governance.close` flushes outside any loop when a Node was not closed: the booking still
    happens and an overrun's alert, which needs the loop to be published, is logged instead."""
    ledger = Ledger(tmp_path / "c.db")
    queue = DeferredSettlements(ledger, Published())

    async def queue_one() -> None:
        (rid,) = held(ledger, 1, usd=1000)
        queue.add(AGENT, rid, usd=2000, tokens_in=1, tokens_out=1)
        queue._handle.cancel()  # type: ignore[union-attr] - the loop ends before its next turn

    try:
        asyncio.run(queue_one())
        with caplog.at_level(logging.WARNING, logger="charter.budget"):
            queue.flush()
        assert use(ledger) == (0, 2000) and queue.booked == 1
        assert any("not published" in r.getMessage() and "alice" in r.getMessage() for r in caplog.records)
    finally:
        ledger.close()


async def test_what_closing_the_gateway_settles_is_booked_and_alerted_before_the_log_closes(tmp_path: Path) -> None:
    """A stream broken by the gateway's own close settles what it delivered, after the first drain
    of `Node.close`: it is still booked, and its overrun alert still reaches the log."""
    home = make_home(tmp_path / "home")
    node = Node(home)
    rid = node.gov.ledger.reserve(agent_id=AGENT.id, role="w", usd=1000, tokens=10, limits=LIMITS).id
    close_gateway = node.gateway.close

    async def closing() -> None:
        await close_gateway()
        node.gov.settlements.add(AGENT, rid, usd=4000, tokens_in=1, tokens_out=1)  # an overrun

    node.gateway.close = closing  # type: ignore[method-assign]
    await node.close()
    ledger = Ledger(home.budget_db_path)
    try:
        assert use(ledger) == (0, 4000)
    finally:
        ledger.close()
    log = SqliteLog(home.db_path)
    try:
        alerts = [loads(e.raw)["payload"] for e in await log.read(0, 10_000) if e.subject == "charter.budget.alerts"]
    finally:
        await log.close()
    assert [(a["kind"], a["usd"], a["name"]) for a in alerts] == [("overrun", 4000, "alice")]


async def test_a_reservation_whose_alert_cannot_be_published_is_given_back(tmp_path: Path) -> None:
    """The gateway reserves, then publishes the budget's soft alert. If that write fails (a full
    disk), nothing went upstream: the money goes back at once, not at the expiry, which would book
    all of it (a gateway reservation is booked in full at its expiry)."""
    from charter.models.types import ChatRequest
    from tests.test_reflect import enrol

    home = make_home(tmp_path / "home")
    node = Node(home)
    await node.start()
    try:
        agent = await enrol(node, "alice", "worker")
        governor = node.gateway.governor(agent, "default")
        ref, kind, model = "openai/gpt-4o-mini", "openai", "gpt-4o-mini"
        node.gov.ledger.set_limit(Limit(f"agent:{agent.id}", "usd", "day", 1_000_000))
        first = await governor.admit(ref, kind, model, ChatRequest([{"role": "user", "content": "hi"}], 50))
        await governor.release(first)  # only to learn what one call reserves
        cap = Limit(f"agent:{agent.id}", "usd", "day", first.reserved_usd)  # one call fills it: a soft alert
        node.gov.ledger.set_limit(cap)

        async def disk_full(*_: Any) -> None:
            raise OSError(28, "No space left on device")

        node.gov.publish_alerts = disk_full  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await governor.admit(ref, kind, model, ChatRequest([{"role": "user", "content": "hi"}], 50))
        assert node.gov.ledger.usage([cap])[0]["reserved"] == 0
        states = node.gov.ledger._db.execute("SELECT state FROM reservations ORDER BY id").fetchall()
        assert [s for (s,) in states] == ["released", "released"]
    finally:
        await node.close()


async def test_a_settlement_waits_for_a_kick_or_its_delay(tmp_path: Path) -> None:
    """In the daemon a settlement waits for the loop to have time to spare: a `kick` (a later call's
    request has gone to its backend) books it at once; without one, `delay` after it was queued."""
    ledger = Ledger(tmp_path / "c.db")
    queue = DeferredSettlements(ledger, Published(), delay=0.2)
    try:
        first, second = held(ledger, 2, usd=1000)
        queue.add(AGENT, first, usd=400, tokens_in=1, tokens_out=1)
        await asyncio.sleep(0.01)
        assert use(ledger) == (2000, 0)  # still held: more spent than there was, never less
        queue.kick()
        assert use(ledger) == (1000, 400) and len(queue) == 0
        queue.add(AGENT, second, usd=300, tokens_in=1, tokens_out=1)
        await asyncio.sleep(0.05)
        assert use(ledger) == (1000, 400)
        await asyncio.sleep(0.3)  # no kick came: the delay books it
        assert use(ledger) == (0, 700) and queue.booked == 2
        queue.kick()  # nothing queued: nothing happens
        assert queue.booked == 2
    finally:
        ledger.close()


async def test_what_answers_left_is_done_once_the_next_call_has_gone_to_its_backend(tmp_path: Path) -> None:
    """The gateway's admission of a call announces its backend request (`Node.backend_call_ahead`):
    the settlement and the call event that earlier answers left queued are then booked and written,
    two turns of the loop later (behind the HTTP client's task that sends the request), long
    before their delay."""
    from charter.models.types import ChatRequest, Final
    from tests.test_reflect import enrol

    home = make_home(tmp_path / "home")
    node = Node(home)
    await node.start()
    try:
        node.gov.settlements.delay = node.deferred.delay = 60.0  # only a kick can book or write them
        node.gov.spares = None  # only what the answers left (spares: tests/test_spares.py)
        agent = await enrol(node, "alice", "worker")
        cap = Limit(f"agent:{agent.id}", "usd", "day", 1_000_000)
        node.gov.ledger.set_limit(cap)
        ref, kind, model = "openai/gpt-4o-mini", "openai", "gpt-4o-mini"
        governor = node.gateway.governor(agent, "default")
        first = await governor.admit(ref, kind, model, ChatRequest([{"role": "user", "content": "one"}], 50))
        await governor.settle(first, Final("stop", 10, 5), "an answer")
        node.emit_soon("charter.test.call", {"n": 1})
        for _ in range(5):
            await asyncio.sleep(0)
        assert node.gov.ledger.usage([cap])[0]["reserved"] == first.reserved_usd  # queued, still held
        assert len(node.deferred) == 1

        second = await governor.admit(ref, kind, model, ChatRequest([{"role": "user", "content": "two"}], 50))
        assert node.gov.ledger.usage([cap])[0]["reserved"] == first.reserved_usd + second.reserved_usd
        await asyncio.sleep(0)
        assert len(node.gov.settlements) == 1  # one hop: the request's writer task runs first
        await asyncio.sleep(0)
        row = node.gov.ledger.usage([cap])[0]
        assert row["reserved"] == second.reserved_usd and row["committed"] == first.price.cost_micros(10, 5)
        for _ in range(5):
            await asyncio.sleep(0)
        assert [loads(e.raw)["payload"] for e in await node.log.read(0, 10_000)
                if e.subject == "charter.test.call"] == [{"n": 1}]
        await governor.release(second)
    finally:
        await node.close()


async def test_a_read_on_a_remote_ledger_waits_for_the_settlements_before_it_only(tmp_path: Path) -> None:
    """A budget read (or a refused reservation asked again) waits for the answers delivered before
    it, not for those that keep coming while a worker thread books: under load, the queue may never
    be empty."""
    ledger = Ledger(tmp_path / "c.db")
    ledger.remote = True  # type: ignore[misc]  # booked from a worker thread, as on PostgreSQL
    gate, started = threading.Event(), threading.Event()
    real = ledger.settle_batch

    def settle_batch(items: Any, now: int | None = None) -> Any:
        if started.is_set():
            gate.wait(10)  # the later answers' booking is stuck (another daemon's row lock, say)
        started.set()
        return real(items, now)

    ledger.settle_batch = settle_batch  # type: ignore[method-assign]
    queue = DeferredSettlements(ledger, Published(), in_thread=asyncio.to_thread, delay=60.0)
    try:
        rids = held(ledger, 16)
        for rid in rids[:8]:
            queue.add(AGENT, rid, usd=100, tokens_in=5, tokens_out=5)
        reading = asyncio.ensure_future(queue.caught_up())
        while not started.is_set():
            await asyncio.sleep(0.001)
        for rid in rids[8:]:  # answered after the read began
            queue.add(AGENT, rid, usd=100, tokens_in=5, tokens_out=5)
        await asyncio.wait_for(reading, 5)
        assert queue.booked == 8 and use(ledger) == (8_000, 800)
        gate.set()
        await queue.drain()
        assert queue.booked == 16 and use(ledger) == (0, 1_600)
    finally:
        gate.set()
        ledger.close()


async def test_a_remote_booking_cancelled_before_it_began_leaves_no_read_waiting(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "c.db")
    ledger.remote = True  # type: ignore[misc]  # booked from a worker thread, as on PostgreSQL
    queue = DeferredSettlements(ledger, Published(), in_thread=asyncio.to_thread, delay=60.0)
    try:
        (rid,) = held(ledger, 1)
        queue.add(AGENT, rid, usd=100, tokens_in=5, tokens_out=5)
        reading = asyncio.ensure_future(queue.caught_up())
        await asyncio.sleep(0)  # the read has started the booking's task, which has not run yet
        assert queue._remote is not None
        queue._remote.cancel()  # (a loop shutting down, say)
        await asyncio.wait_for(reading, 5)  # the read starts another one, and is answered
        assert queue.booked == 1 and use(ledger) == (0, 100)
    finally:
        ledger.close()

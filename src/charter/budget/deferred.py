"""Model calls' settlements, booked a moment after their answers, many in one transaction.

A gateway call with a budget takes two ledger transactions. The reservation must come before the
backend is called: it is what keeps concurrent calls from crossing a cap. The settlement need not
hold the answer back: until it is booked the reservation stays held at its full amount, so every
admission meanwhile sees more spent than there was, never less. Booked inline, at one request at a
time, it cost ~0.12 ms of SQLite work in isolation and ~0.28 ms in the daemon (its COMMIT, and the
pages the log's writes had made stale), all of it before the answer went out.

`DeferredSettlements` books them a moment later instead, up to `MAX_BATCH` in one transaction
(`settle_batch`), so under load several calls share one COMMIT; more than that are booked over the
following turns of the loop, a slice per turn, so that the requests in flight get the loop in
between (at 16 calls in flight, one transaction for all of them held up the slowest answers: added
p99 x1.2 side by side, against x0.85 with slices of 8).

When: in the daemon, while it waits for a backend. Booked at the next turn of the loop, as they
were, the settlement fell just when an agent calling one request at a time sent its next request,
which waited for it. The gateway now calls `kick` (through `Node.backend_call_ahead`) once the next
model call's request has gone upstream, with `delay` (5 ms there) as the latest when no call
comes; see charter.bus.deferred, whose call events are written at the same moment. A remote
ledger's settlements start at the next turn (`delay` 0): booked from a worker thread, they cost
the loop next to nothing. Until booked, a reservation stays held at its full amount: a budget read
meanwhile sees more spent than there was, never less, and the daemon's budget reads book what was
queued before them first (`caught_up`). On the local ledger a reservation refused while
settlements are queued is asked again once they are booked (`Governance._reserve`): an agent's
next call near its cap is not refused for its last answer.

What it costs: a daemon killed between an answer and its booking leaves the reservation held, as
one killed while the backend was still answering does; its expiry books it in full (the gateway
reserves with `on_expiry = "book"`), more than was spent, never less. The window this adds is
`delay` at most. A settlement that fails (a reservation unknown or closed already, a database
error) is logged with its reservation and agent, never raised into an answer sent already; its
reservation, still held, is booked in full at its expiry too. Overrun alerts are published once
booked. `drain` books whatever is queued (shutdown).

A remote ledger (PostgreSQL, `ledger.remote`) is booked from a worker thread instead, a slice at a
time: a round trip, or a usage row that another daemon's reservation holds locked, then keeps one
booking waiting, not the loop and every request on it. A budget read right after an answer may
then find its reservation still held (more spent than there was, never less).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from charter.budget.ledger import SettleItem, Settlement
from charter.errors import CharterError
from charter.identity.registry import AgentRecord

log = logging.getLogger("charter.budget")

MAX_BATCH = 8  # settlements per transaction (and per turn of the loop) at most

Publish = Callable[[AgentRecord, list[dict[str, Any]]], Awaitable[None]]
InThread = Callable[..., Awaitable[Any]]


class BatchLedger(Protocol):
    remote: bool

    def settle_batch(self, items: Sequence[SettleItem], now: int | None = None) -> list[Settlement | Exception]: ...


class DeferredSettlements:
    def __init__(self, ledger: BatchLedger, publish_alerts: Publish, *, max_batch: int = MAX_BATCH,
                 in_thread: InThread = asyncio.to_thread, delay: float = 0.0) -> None:
        """`in_thread` runs a remote ledger's booking on a worker thread (`LedgerThreads.call`);
        `delay` is how long a settlement may wait for a `kick` (0: the next turn of the loop)."""
        self._ledger, self._publish, self._in_thread = ledger, publish_alerts, in_thread
        self.max_batch, self.delay = max_batch, delay
        self._pending: list[tuple[SettleItem, AgentRecord]] = []
        self._handle: asyncio.Handle | None = None
        self._remote: asyncio.Task[None] | None = None  # a remote ledger's booking, on a worker thread
        self._alerts: set[asyncio.Task[None]] = set()
        self.booked = 0
        self.failed = 0
        self._added = 0  # settlements ever queued; `booked + failed` of them are done (see `caught_up`)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (settlements done by then, its waiter)

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def owed(self) -> bool:
        """Settlements queued or being booked: their reservations still hold their full amounts."""
        return self.booked + self.failed < self._added

    def add(self, agent: AgentRecord, reservation_id: str, *, usd: int, tokens_in: int, tokens_out: int) -> None:
        """Queue one settlement; it is booked by the next `kick`, or `delay` later."""
        self._pending.append((SettleItem(reservation_id, usd, tokens_in, tokens_out, agent.id), agent))
        self._added += 1
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._handle = (loop.call_later(self.delay, self._next_turn) if self.delay > 0
                            else loop.call_soon(self._next_turn))

    def kick(self) -> None:
        """Book what is queued now: the loop has time to spare (a backend call is on its way)."""
        if self._handle is not None:
            self._handle.cancel()
            self._next_turn()

    def flush(self, *, publish: bool = True) -> None:
        """Book everything queued now, `max_batch` per transaction. With `publish=False` (the
        ledger's last moments, the log may be closed) overrun alerts are logged, not published."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self._pending:
            self._book_slice(publish)

    def _next_turn(self) -> None:
        """One slice per turn of the loop: requests in flight get the loop between two slices."""
        self._handle = None
        if self._ledger.remote:  # PostgreSQL: booked from a worker thread, one slice at a time
            if self._remote is None:
                self._start_remote()
            return
        self._book_slice(True)
        if self._pending:
            self._handle = asyncio.get_running_loop().call_soon(self._next_turn)

    def _start_remote(self) -> None:
        task = asyncio.get_running_loop().create_task(self._book_remote())
        self._remote = task

        def ended(_: asyncio.Task[None]) -> None:  # done, or cancelled even before it began
            if self._remote is task:
                self._remote = None
            self._wake(everyone=True)  # nobody waits for it any more: a waiter checks again

        task.add_done_callback(ended)

    async def _book_remote(self) -> None:
        """A remote ledger's slices, each from a worker thread: its round trips (and a row lock that
        another daemon holds) never stall the loop. Until booked, a reservation stays held."""
        try:
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                try:
                    results = await self._in_thread(self._ledger.settle_batch, [item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - the answers are out; what is left is to say so
                    for item, agent in batch:
                        self._fail(item, agent, f"{type(exc).__name__}: {exc}")
                else:
                    self._booked(batch, results, True)
                self._wake(everyone=False)
        finally:
            self._remote = None

    def _book_slice(self, publish: bool) -> None:
        batch = self._pending[:self.max_batch]
        del self._pending[:self.max_batch]
        self._book(batch, publish)

    def _book(self, batch: list[tuple[SettleItem, AgentRecord]], publish: bool) -> None:
        try:
            results = self._ledger.settle_batch([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the answers are out; what is left is to say so
            for item, agent in batch:
                self._fail(item, agent, f"{type(exc).__name__}: {exc}")
            return
        self._booked(batch, results, publish)

    def _booked(self, batch: list[tuple[SettleItem, AgentRecord]], results: list[Settlement | Exception],
                publish: bool) -> None:
        for (item, agent), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                why = result.message if isinstance(result, CharterError) else f"{type(result).__name__}: {result}"
                self._fail(item, agent, why)
                continue
            self.booked += 1
            if result.alerts:
                self._publish_soon(agent, result.alerts, publish)

    def _publish_soon(self, agent: AgentRecord, alerts: list[dict[str, Any]], publish: bool = True) -> None:
        try:
            loop = asyncio.get_running_loop() if publish else None
        except RuntimeError:  # booked by a close() outside the loop
            loop = None
        if loop is None:  # the alert can only be logged
            for alert in alerts:
                log.warning("budget alert for %s not published (shutting down): %s", agent.name, alert,
                            extra={"fields": {"agent": agent.name, "alert": alert}})
            return
        task = loop.create_task(self._publish(agent, alerts))
        self._alerts.add(task)
        task.add_done_callback(self._alerts.discard)

    def _fail(self, item: SettleItem, agent: AgentRecord, why: str) -> None:
        self.failed += 1
        log.error("the settlement of %s (agent %s) could not be booked: %s", item.reservation_id, agent.name, why,
                  extra={"fields": {"reservation_id": item.reservation_id, "agent": agent.name, "error": why,
                                    "usd_micros": item.usd, "tokens": item.tokens_in + item.tokens_out}})

    async def caught_up(self) -> None:
        """Book the settlements queued so far, and wait for them only (a budget read: it must see
        the answers delivered before it asked, and is never held up by those answered after)."""
        if not self._ledger.remote:
            self.flush()
            return
        upto = self._added
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self.booked + self.failed < upto and (self._pending or self._remote is not None):
            if self._remote is None:
                self._start_remote()
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((upto, done))
            await done  # woken once those are booked, not when the queue is empty (it may never be)

    def _wake(self, *, everyone: bool) -> None:
        done = self.booked + self.failed
        keep = []
        for upto, fut in self._waiters:
            if everyone or upto <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((upto, fut))
        self._waiters = keep

    async def drain(self) -> None:
        """Book what is queued and publish its alerts (shutdown, or a caller that needs it booked)."""
        if self._ledger.remote:  # booked from a worker thread, never inline on the loop
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            while self._pending or self._remote is not None:  # (one added meanwhile, too)
                if self._remote is None:
                    self._start_remote()
                await asyncio.shield(self._remote)
        else:
            self.flush()
        while self._alerts:
            await asyncio.gather(*list(self._alerts), return_exceptions=True)

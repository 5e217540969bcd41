"""Operator events that nobody waits for, sealed and appended together a moment later.

A model call's event is written after its answer has gone out: the agent does not wait for the
signature and the log write. Written one by one, each such event still cost a transaction of its
own (~0.1 ms of SQLite work, most of it the COMMIT).

`DeferredEvents` queues them and writes every event queued meanwhile in one transaction (group
commit): under load many events share one COMMIT. Sealing is done at write time, a few events at
a time with the loop let go in between, so a large batch never stalls other requests for long.

When: while the daemon waits for a backend. The gateway calls `kick` (through
`Node.backend_call_ahead`) once the next model call's request has gone upstream, where the loop
has at least a network round trip to spare; with no such call, `DELAY` after the first event was
queued. The settlements of the calls' reservations are booked at the same moment
(charter.budget.deferred): at the next turn of the loop, as before, that booking fell just when an
agent calling one request at a time sent its next request, which waited for it. Side by side
(gateway_compare, c=1, 6,000 calls a side): with a budget, added p50 x0.83 for whole answers and
x0.68 for streams; without one (the events alone) x1.00. A timer of 1 ms, tried earlier for the
events, cost 0.2-0.36 ms p50: it woke an idle core on every call. The timer here fires only when
no call came to do the work in the shadow of.

What it costs: an event is in memory until it is written, `DELAY` after it was queued (or once a
write under way ends); a daemon killed in between loses it (the answer was delivered; a settlement
queued with it leaves its reservation to be booked in full at its expiry). A clean shutdown writes
every queued event first (`drain`), and a read of the log through the daemon (`Node.read_recent`:
`/v1/events`, `charter tail`, MCP) writes those queued before it (`caught_up`). A write that fails
(a full disk, a database locked past its busy timeout) is logged with each event's subject and
agent, never raised into a request answered already.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from charter.bus.envelope import Envelope

log = logging.getLogger("charter.bus")

DELAY = 0.005  # seconds from the first queued event to its write when no backend call comes first
MAX_BATCH = 256  # events per transaction at most
SEAL_SLICE = 8  # events sealed between two turns of the loop

Seal = Callable[[str, Any], Envelope]
Write = Callable[[Sequence[Envelope]], Awaitable[list[str | None]]]  # per envelope: None, or why it was refused


class DeferredEvents:
    def __init__(self, seal: Seal, write: Write, *, delay: float = DELAY, max_batch: int = MAX_BATCH) -> None:
        self._seal, self._write = seal, write
        self.delay, self.max_batch = delay, max_batch
        self._pending: list[tuple[str, Any]] = []
        self._timer: asyncio.Handle | None = None
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.lost = 0
        self._added = 0  # events ever queued; `written + lost` of them are done (see `caught_up`)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, subject: str, payload: Any) -> None:
        """Queue one event; it is written by the next `kick`, or `delay` later (0: the next turn)."""
        self._pending.append((subject, payload))
        self._added += 1
        if self._task is not None or self._timer is not None:
            return  # a write is coming, and takes whatever is queued by then
        loop = asyncio.get_running_loop()
        if len(self._pending) >= self.max_batch:
            self._start()
        elif self.delay <= 0:
            self._timer = loop.call_soon(self._start)
        else:
            self._timer = loop.call_later(self.delay, self._start)

    def kick(self) -> None:
        """Write what is queued now: the loop has time to spare (a backend call is on its way)."""
        if self._timer is not None:
            self._start()

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()  # (a no-op when it is the timer that fired)
            self._timer = None
        if self._task is None and self._pending:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                await self._write_batch(batch)
        finally:
            self._task = None

    async def _write_batch(self, batch: list[tuple[str, Any]]) -> None:
        sealed: list[tuple[str, Any, Envelope]] = []
        for i, (subject, payload) in enumerate(batch):
            if i and i % SEAL_SLICE == 0:
                await asyncio.sleep(0)  # let requests in between slices
            try:
                sealed.append((subject, payload, self._seal(subject, payload)))
            except Exception as exc:  # noqa: BLE001 - this event cannot be sealed; the others still go
                self._lose(subject, payload, f"{type(exc).__name__}: {exc}")
        if not sealed:
            return
        try:
            refusals = await self._write([env for _, _, env in sealed])
        except Exception as exc:  # noqa: BLE001 - the answers are out; what is left is to say so
            for subject, payload, _ in sealed:
                self._lose(subject, payload, f"{type(exc).__name__}: {exc}")
            return
        for (subject, payload, _), why in zip(sealed, refusals, strict=True):
            if why is None:
                self.written += 1
            else:
                self._lose(subject, payload, why)

    def _lose(self, subject: str, payload: Any, why: str) -> None:
        self.lost += 1
        who = payload.get("name") if isinstance(payload, dict) else None
        log.error("an event on %s (agent %s) could not be written: %s", subject, who or "-", why,
                  extra={"fields": {"subject": subject, "agent": who, "error": why}})

    async def caught_up(self) -> None:
        """Write the events queued so far, and wait for them only: a reader of the log (it must
        not miss an event queued before it asked) is never held up by the events queued after."""
        upto = self._added
        self.kick()
        while self.written + self.lost < upto:
            if self._task is None:
                if not self._pending:
                    return
                self._start()
            task = self._task
            if task is not None:
                await asyncio.shield(task)

    async def drain(self) -> None:
        """Write everything queued now (shutdown, or a caller that needs the events in the log)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._task is not None or self._pending:
            if self._task is None:
                self._start()
            task = self._task
            if task is not None:
                await asyncio.shield(task)

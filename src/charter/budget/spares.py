"""Spare reservations: the next model call's budget, reserved ahead and off its path.

A paid call must be reserved for before its backend is called, and a reservation is a ledger
transaction: ~0.1 ms in the daemon, on the call's path. An agent that calls a model often is
about to need another reservation just like its last one. `Spares` makes that one ahead, while
the loop waits for a backend anyway (`Node.backend_call_ahead`), and the agent's next call with the
same limits, model and terms takes it from memory if it asks for no more than it holds. A spare
holds `SLACK` times what the last call asked: a conversation's prompt grows from call to call.
An agent with many calls in flight outruns one spare: each call that finds none left doubles how
many are kept for it, up to `MAX_PER_KEY`, made together in one transaction once half are taken
(`Ledger.reserve_many`), so that a reservation costs a share of a transaction, not one each (at 16
calls in flight with a budget, side by side in three runs: the daemon's CPU per call x0.90-0.97,
added p50 x0.83-0.92).

Exactness is kept. A spare is an ordinary reservation, held in every limit that binds the call like
a call in flight, so no cap can be crossed through it. They are made only while every limit keeps
`HEADROOM` times their amount free after them, and never when they would raise a soft alert (the
call that is made raises it): near a cap the calls reserve on demand, one by one, exactly as
without spares. Nobody is refused for money a spare holds: a reservation refused while spares are
held is asked again once they are given back (`Governance._reserve`), whoever asks it. A spare is
taken only within `IDLE_MS` of its making, and none is made within `2 * IDLE_MS` of the end of one
of its periods, so the period it was charged to is the call's. One nobody took is given back after
`IDLE_MS` to `IDLE_MS` + 1 s (by the daemon's sweep, every second; half as many are kept from
then on), when the daemon stops, and before a budget is read through the daemon, which then shows
what calls in flight hold; all that are given back together in one transaction
(`Ledger.release_batch`). One whose release fails (the ledger busy) is tried again at the next
sweep. A change of any limit that binds the agent changes the key spares are filed under: the
next call reserves on demand.

What it costs: a spare is reserved with the gateway's `on_expiry = "book"`, as the call that takes
it would have been. The ledger cannot tell a spare taken by a call still in flight from one still
waiting, so if the daemon is killed, each is booked in full at its expiry: a crash can book, per
agent, model and set of limits, up to `MAX_PER_KEY` calls that were never made (one for an agent
calling one at a time), at `SLACK` times their last size, on top of the calls in flight that it
books already (more than was spent, never less). Spares are made for the local SQLite ledger
only: a PostgreSQL ledger shared by several daemons reserves on demand, from a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from charter.budget.ledger import BUDGET_EXCEEDED, Limit, Reservation
from charter.budget.periods import period_key
from charter.errors import CharterError

log = logging.getLogger("charter.budget")

HEADROOM = 8  # spares are made only while each limit keeps 8 times their amount free after them
IDLE_MS = 2_000  # a spare not taken within this is given back
FIRST_TARGET = 1  # spares kept per agent, model and terms at first: for an agent calling one at a time
MAX_PER_KEY = 16  # ...and at most, for an agent with many calls in flight
SLACK = 1.5  # a spare holds this many times what the last call asked (prompts grow)


def _now() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Spare:
    reservation: Reservation
    made_ms: int


class Spares:
    def __init__(self, ledger: Any, *, headroom: int = HEADROOM, idle_ms: int = IDLE_MS,
                 max_per_key: int = MAX_PER_KEY) -> None:
        self.ledger = ledger
        self.headroom, self.idle_ms, self.max_per_key = headroom, idle_ms, max_per_key
        self._pools: dict[Hashable, list[Spare]] = {}
        self._targets: dict[Hashable, int] = {}  # key -> how many spares to keep (see `want`)
        self._last_call: dict[Hashable, int] = {}  # key -> when a call last reserved under it
        self._wanted: dict[Hashable, dict[str, Any]] = {}  # key -> Ledger.reserve's keyword arguments
        self._unreturned: list[Spare] = []  # releases that failed: tried again at the next sweep

    @property
    def wanted(self) -> bool:
        """Spares are to be made at the next `refill`."""
        return bool(self._wanted)

    @staticmethod
    def key(agent_id: str, role: str, model: str, action: str, on_expiry: str, ttl_s: float,
            limits: list[Limit]) -> Hashable:
        return (agent_id, role, model, action, on_expiry, ttl_s, tuple(limits))

    def take(self, key: Hashable, usd: int, tokens: int, now: int | None = None) -> Reservation | None:
        """A spare holding at least `usd` and `tokens` under `key`, or None (reserve on demand)."""
        pool = self._pools.get(key)
        if not pool:
            if key in self._targets:  # the agent outran its spares: keep more of them
                self._targets[key] = min(self._targets[key] * 2, self.max_per_key)
            return None
        now = _now() if now is None else now
        for i, spare in enumerate(pool):  # the oldest first: none goes stale while newer ones are taken
            if now - spare.made_ms < self.idle_ms and spare.reservation.usd >= usd and spare.reservation.tokens >= tokens:
                del pool[i]
                return spare.reservation
        return None

    def want(self, key: Hashable, terms: dict[str, Any], now: int | None = None) -> None:
        """A call just reserved under `key` with `terms`: if another came within `idle_ms` before
        it, the agent calls often, and spares like this one are made at the next `refill`.

        How many: `FIRST_TARGET` at first, twice as many each time a call finds none left (an agent
        with many calls in flight), up to `max_per_key`, and half as many each time some are given
        back untaken. They are made once half of them are taken, all in one transaction: with
        many calls in flight, a reservation then costs a share of a transaction, not one each."""
        now = _now() if now is None else now
        last = self._last_call.get(key)
        self._last_call[key] = now
        if last is None or now - last >= self.idle_ms:
            return
        target = self._targets.setdefault(key, min(FIRST_TARGET, self.max_per_key))
        if len(self._pools.get(key, ())) <= target // 2:
            self._wanted[key] = terms

    def refill(self, now: int | None = None) -> None:
        """Make the spares wanted (the loop has time to spare: a backend call is on its way)."""
        wanted, self._wanted = self._wanted, {}
        for key, terms in wanted.items():
            pool = self._pools.setdefault(key, [])
            count = self._targets.get(key, FIRST_TARGET) - len(pool)
            if count < 1:
                continue
            t = _now() if now is None else now
            ahead = {**terms, "usd": int(terms["usd"] * SLACK), "tokens": int(terms["tokens"] * SLACK)}
            try:
                if any(period_key(lim.period, t, self.ledger.tz) != period_key(lim.period, t + 2 * self.idle_ms,
                                                                               self.ledger.tz)
                       for lim in terms["limits"]):
                    continue  # a period ends soon: a call taking it might be charged to the one before
                made = self.ledger.reserve_many(count, **ahead, headroom=self.headroom, now=t)
            except CharterError as exc:
                if exc.code != BUDGET_EXCEEDED:
                    log.warning("a spare reservation could not be made: %s", exc.message,
                                extra={"fields": {"agent_id": terms["agent_id"], "error": exc.message}})
                # Too many for the room left: fewer next time (one alone may still fit).
                self._targets[key] = max(self._targets.get(key, FIRST_TARGET) // 2, min(FIRST_TARGET, self.max_per_key))
                continue  # near a cap, or near a soft alert: calls reserve on demand
            except Exception as exc:  # noqa: BLE001 - a spare is an optimisation; the next call reserves itself
                log.warning("a spare reservation could not be made: %s", exc,
                            extra={"fields": {"agent_id": terms["agent_id"], "error": str(exc)}})
                continue
            pool += [Spare(res, t) for res in made]

    def expire(self, now: int | None = None) -> int:
        """Give back every spare older than `idle_ms`; forget keys not called under since."""
        now = _now() if now is None else now
        stale: list[Spare] = []
        for key in list(self._pools):
            pool = self._pools[key]
            keep = [s for s in pool if now - s.made_ms < self.idle_ms]
            old = [s for s in pool if now - s.made_ms >= self.idle_ms]
            if old and key in self._targets:  # more than the agent takes: keep fewer
                self._targets[key] = max(self._targets[key] // 2, min(FIRST_TARGET, self.max_per_key))
            stale += old
            if keep:
                self._pools[key] = keep
            else:
                del self._pools[key]
        for key in [k for k, t in self._last_call.items() if now - t >= self.idle_ms]:
            del self._last_call[key]
            self._targets.pop(key, None)
        stale += self._unreturned
        self._unreturned = []
        return self._give_back(stale)

    def release_all(self) -> int:
        """Give back every spare (the daemon stops, or a budget is about to be read)."""
        spares = [s for pool in self._pools.values() for s in pool] + self._unreturned
        self._pools.clear()
        self._wanted.clear()
        self._unreturned = []
        return self._give_back(spares)

    def held(self) -> int:
        """Spares holding money now (those whose release failed included)."""
        return sum(len(p) for p in self._pools.values()) + len(self._unreturned)

    def _give_back(self, spares: list[Spare]) -> int:
        """Release `spares` in one transaction; those that could not be are tried again at the next
        sweep (else their expiry would book them)."""
        if not spares:
            return 0
        try:
            results = self.ledger.release_batch([s.reservation.id for s in spares])
        except Exception as exc:  # noqa: BLE001 - the transaction itself failed (the ledger busy): all kept
            log.warning("%d spare reservations could not be given back: %s", len(spares), exc,
                        extra={"fields": {"reservations": [s.reservation.id for s in spares], "error": str(exc)}})
            self._unreturned += spares
            return len(spares)
        for spare, result in zip(spares, results, strict=True):
            if result is None:
                continue
            rid = spare.reservation.id
            if isinstance(result, CharterError):  # released or swept meanwhile: nothing is held any more
                log.warning("a spare reservation was closed already: %s", result.message,
                            extra={"fields": {"reservation_id": rid, "error": result.message}})
                continue
            log.warning("a spare reservation could not be given back: %s", result,
                        extra={"fields": {"reservation_id": rid, "error": str(result)}})
            self._unreturned.append(spare)
        return len(spares)

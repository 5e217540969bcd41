"""Spare reservations (`charter.budget.spares`): an agent that calls often finds its next call's
reservation made ahead, while its last call waited for the backend. A spare never lets a cap be
crossed, never refuses a call, is never made near a cap or near the end of a period, is given
back when nobody takes it, when the daemon stops and before a budget is read, and a changed limit
is never bypassed through one."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from charter.budget.ledger import BUDGET_EXCEEDED, Ledger, Limit
from charter.budget.spares import SLACK, Spares
from charter.errors import CharterError
from charter.identity.registry import AgentRecord
from charter.models.gateway import Admission, CallGovernor
from charter.models.router import Skip
from charter.models.types import ChatRequest, Final
from charter.node import Node
from tests.conftest import make_home

pytestmark = pytest.mark.anyio

REF, KIND, MODEL = "openai/gpt-4o-mini", "openai", "gpt-4o-mini"


@dataclass
class Caller:
    node: Node
    agent: AgentRecord
    governor: CallGovernor

    async def admit(self, prompt: str = "hello") -> Admission:
        adm = await self.governor.admit(REF, KIND, MODEL, ChatRequest([{"role": "user", "content": prompt}], 50))
        await turns()  # the bookkeeping's hops: what a backend call's wait would give it
        return adm

    async def call(self, prompt: str = "hello") -> Admission:
        adm = await self.admit(prompt)
        await self.governor.settle(adm, Final("stop", 10, 5), "an answer")
        return adm

    def limit(self, usd_micros: int) -> Limit:
        lim = Limit(f"agent:{self.agent.id}", "usd", "day", usd_micros)
        self.node.gov.ledger.set_limit(lim)
        return lim

    def reserved(self, lim: Limit) -> int:
        return self.node.gov.ledger.usage([lim])[0]["reserved"]

    def spare_ids(self) -> set[str]:
        assert self.node.gov.spares is not None
        return {s.reservation.id for pool in self.node.gov.spares._pools.values() for s in pool}


async def turns(n: int = 4) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
async def caller(tmp_path: Path) -> AsyncIterator[Caller]:
    from tests.test_reflect import enrol

    node = Node(make_home(tmp_path / "home"))
    await node.start()
    try:
        agent = await enrol(node, "alice", "worker")
        yield Caller(node, agent, node.gateway.governor(agent, "default"))
    finally:
        await node.close()


async def one_call_costs(caller: Caller) -> int:
    """What one call reserves (a throwaway call under a roomy limit, given back)."""
    caller.limit(10**9)
    adm = await caller.governor.admit(REF, KIND, MODEL, ChatRequest([{"role": "user", "content": "hello"}], 50))
    await caller.governor.release(adm)
    assert caller.node.gov.spares is not None
    caller.node.gov.spares.release_all()
    caller.node.gov.spares._last_call.clear()
    return adm.reserved_usd


async def test_an_agent_that_calls_often_takes_its_next_reservation_from_a_spare(caller: Caller) -> None:
    lim = caller.limit(100 * await one_call_costs(caller))
    first = await caller.call()
    assert caller.spare_ids() == set()  # one call is not a habit
    second = await caller.call()
    (spare,) = caller.spare_ids()  # the second, within the idle time, made one while it waited
    assert spare not in (first.reservation_id, second.reservation_id)
    third = await caller.admit()
    assert third.reservation_id == spare  # taken from memory: no ledger transaction on its path
    await caller.governor.settle(third, Final("stop", 10, 5), "an answer")
    await caller.node.gov.settlements.drain()
    spares = caller.spare_ids()
    assert len(spares) == 1 and caller.reserved(lim) == int(first.reserved_usd * SLACK)  # the next one's, only
    # every call was booked at its real use, the spares at nothing
    spent = caller.node.gov.ledger.usage([lim])[0]["committed"]
    assert spent == 3 * first.price.cost_micros(10, 5)


async def test_near_a_cap_no_spare_is_made(caller: Caller) -> None:
    cost = await one_call_costs(caller)
    lim = caller.limit(6 * cost)  # less than the headroom a spare needs
    for _ in range(4):
        await caller.call()
    await caller.node.gov.settlements.drain()
    assert caller.spare_ids() == set() and caller.reserved(lim) == 0
    rows = caller.node.gov.ledger._db.execute("SELECT COUNT(*) FROM reservations WHERE state = 'released'").fetchone()
    assert rows[0] == 1  # only one_call_costs' own: nothing was reserved and given back meanwhile


async def test_money_a_spare_holds_never_refuses_a_call(caller: Caller) -> None:
    cost = await one_call_costs(caller)
    lim = caller.limit(20 * cost)
    await caller.call()
    await caller.call()
    await caller.node.gov.settlements.drain()
    assert len(caller.spare_ids()) == 1
    left = 20 * cost - caller.node.gov.ledger.usage([lim])[0]["committed"]
    # another action asks for everything that is left: only the spare stands in its way
    spend = caller.node.gov.admit_spend(caller.agent, "model.call", {"provider": KIND, "backend": "openai",
                                                                     "model": MODEL, "paid": True,
                                                                     "amount_usd": left / 1e6, "tokens": 0},
                                        usd=left, tokens=0, model="openai/other", ttl_s=60)
    assert spend.reservation is not None and spend.reservation.usd == left
    assert caller.spare_ids() == set() and caller.reserved(lim) == left


async def test_a_changed_limit_is_never_bypassed_through_a_spare(caller: Caller) -> None:
    cost = await one_call_costs(caller)
    caller.limit(100 * cost)
    await caller.call()
    await caller.call()
    assert len(caller.spare_ids()) == 1
    committed = caller.node.gov.ledger.usage([Limit(f"agent:{caller.agent.id}", "usd", "day", 0)])[0]["committed"]
    caller.limit(committed + cost // 2)  # lowered below one call: the spare was made under the old one
    with pytest.raises(Skip, match="budget"):
        await caller.admit()


async def test_a_spare_nobody_takes_is_given_back(caller: Caller) -> None:
    lim = caller.limit(100 * await one_call_costs(caller))
    await caller.call()
    await caller.call()
    await caller.node.gov.settlements.drain()
    (spare,) = caller.spare_ids()
    spares = caller.node.gov.spares
    assert spares is not None and caller.reserved(lim) > 0
    assert spares.expire() == 0  # not yet idle
    assert spares.expire(now=spares._pools[next(iter(spares._pools))][0].made_ms + spares.idle_ms) == 1
    assert caller.reserved(lim) == 0
    state = caller.node.gov.ledger._db.execute("SELECT state FROM reservations WHERE id = ?", (spare,)).fetchone()
    assert state == ("released",)


async def test_a_budget_read_gives_the_spares_back(caller: Caller) -> None:
    lim = caller.limit(100 * await one_call_costs(caller))
    await caller.call()
    await caller.call()
    assert caller.spare_ids()
    view = await caller.node.gov.budget_view(caller.agent)
    (row,) = [r for r in view["limits"] if r["scope"] == lim.scope and r["unit"] == "usd" and r["period"] == "day"]
    assert row["reserved"] == 0 and caller.spare_ids() == set()


async def test_a_stopping_daemon_gives_its_spares_back(tmp_path: Path) -> None:
    from tests.test_reflect import enrol

    home = make_home(tmp_path / "home")
    node = Node(home)
    await node.start()
    try:
        agent = await enrol(node, "alice", "worker")
        caller = Caller(node, agent, node.gateway.governor(agent, "default"))
        caller.limit(10**9)
        await caller.call()
        await caller.call()
        assert caller.spare_ids()
    finally:
        await node.close()
    db = sqlite3.connect(home.budget_db_path)
    try:
        assert db.execute("SELECT COUNT(*) FROM reservations WHERE state = 'held'").fetchone() == (0,)
    finally:
        db.close()


def gateway_terms(lim: Limit) -> tuple[dict[str, Any], Hashable]:
    """What the gateway reserves with for one call of $0.001 and 10 tokens, and its spares' key."""
    terms = {"agent_id": "agt_a", "role": "w", "usd": 1000, "tokens": 10, "limits": [lim], "model": REF,
             "action": "model.call", "ttl_s": 60.0, "on_expiry": "book"}
    return terms, Spares.key("agt_a", "w", REF, "model.call", "book", 60.0, [lim])


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "b.db")
    yield opened
    opened.close()


def test_no_spare_is_made_near_the_end_of_a_period(ledger: Ledger) -> None:
    lim = Limit("global", "usd", "hour", 10**9)
    spares = Spares(ledger)
    terms, key = gateway_terms(lim)
    hour = 1_800_000_000_000 // 3_600_000 * 3_600_000  # the start of an hour
    end = hour + 3_600_000
    for made_at, expected in ((end - 3_000, 0), (hour + 1_000, 1)):
        spares.want(key, terms, now=made_at - 10)
        spares.want(key, terms, now=made_at - 5)  # a second call: a habit
        spares.refill(now=made_at)
        assert spares.held() == expected, made_at
    assert spares.take(key, 1000, 10, now=hour + 1_000 + spares.idle_ms) is None  # too old to take
    assert spares.take(key, 1501, 10, now=hour + 1_500) is None  # holds less than asked (1.5 x 1000)
    assert spares.take(key, 1500, 15, now=hour + 1_500) is not None


async def test_the_next_call_at_the_cap_is_not_refused_for_the_last_answer_still_to_be_booked(caller: Caller) -> None:
    """An answer's settlement is booked while a later call waits for its backend: the next call
    reserves while the last one's reservation is still held at its full size. At the cap, it is
    asked again once the queued settlements are booked, and fits."""
    cost = await one_call_costs(caller)
    caller.node.gov.settlements.delay = 60.0  # only the next call's bookkeeping would book it
    first = await caller.governor.admit(REF, KIND, MODEL, ChatRequest([{"role": "user", "content": "hello"}], 50))
    spent = first.price.cost_micros(10, 5)
    lim = caller.limit(cost + spent)  # room for one call beside the first one's real cost, not its reservation
    await caller.governor.settle(first, Final("stop", 10, 5), "an answer")
    assert len(caller.node.gov.settlements) == 1 and caller.reserved(lim) == cost  # queued, still held
    second = await caller.governor.admit(REF, KIND, MODEL, ChatRequest([{"role": "user", "content": "hello"}], 50))
    usage = caller.node.gov.ledger.usage([lim])[0]
    assert (usage["committed"], usage["reserved"]) == (spent, cost) and second.reservation_id


def test_a_spare_whose_release_fails_is_given_back_at_the_next_sweep(ledger: Ledger) -> None:
    lim = Limit("global", "usd", "day", 10**9)
    spares = Spares(ledger)
    terms, key = gateway_terms(lim)
    spares.want(key, terms)
    spares.want(key, terms)
    spares.refill()
    assert spares.held() == 1 and ledger.usage([lim])[0]["reserved"] == 1500
    release = ledger.release_batch

    def busy(*args: Any, **kw: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    ledger.release_batch = busy  # type: ignore[method-assign]
    spares.release_all()
    assert spares.held() == 1 and ledger.usage([lim])[0]["reserved"] == 1500  # kept, to be tried again
    ledger.release_batch = release  # type: ignore[method-assign]
    spares.expire()
    assert spares.held() == 0 and ledger.usage([lim])[0]["reserved"] == 0


def test_an_agent_that_outruns_its_spares_gets_more_made_in_one_transaction(ledger: Ledger) -> None:
    """Many calls in flight: each call that finds no spare left doubles how many are kept (up to
    `max_per_key`), and they are made together, one ledger transaction for all of them, once half
    are taken. Spares given back untaken halve it again."""
    lim = Limit("global", "usd", "day", 10**9)
    spares = Spares(ledger)
    terms, key = gateway_terms(lim)
    made: list[int] = []
    reserve_many = ledger.reserve_many

    def counted(count: int, **kw: Any) -> Any:
        made.append(count)
        return reserve_many(count, **kw)

    ledger.reserve_many = counted  # type: ignore[method-assign]
    noon = (time.time_ns() // 86_400_000_000_000) * 86_400_000 + 43_200_000  # today, far from its end
    spares.want(key, terms, now=noon)
    spares.want(key, terms, now=noon + 1)
    spares.refill(now=noon + 1)
    assert made == [1]  # an agent calling one at a time: one spare
    now, served = noon + 2, 0
    for i in range(64):  # calls faster than refills: a refill every 8 calls
        served += spares.take(key, 1000, 10, now=now + i) is not None
        spares.want(key, terms, now=now + i)
        if i % 8 == 7:
            spares.refill(now=now + i)
    assert max(made) == spares.max_per_key  # each call that found none doubled it: 2, 4, 8, then the most
    assert served >= 56 and len(made) <= 9  # 7 in 8 calls took a spare; 9 transactions made them all
    assert ledger.usage([lim])[0]["reserved"] == sum(made) * 1500  # every spare held, taken or not
    now += 64
    assert spares.held() == spares.max_per_key
    spares.want(key, terms, now=now + spares.idle_ms - 1)  # the agent still calls, but takes none
    assert spares.expire(now=now + spares.idle_ms) == spares.max_per_key  # given back untaken
    assert ledger.usage([lim])[0]["reserved"] == (sum(made) - spares.max_per_key) * 1500  # the taken ones left
    spares.want(key, terms, now=now + spares.idle_ms + 1)
    spares.refill(now=now + spares.idle_ms + 1)
    assert made[-1] == spares.max_per_key // 2  # so half as many are kept


def test_an_agent_taking_spares_steadily_never_leaves_one_to_go_stale(ledger: Ledger) -> None:
    """Spares are taken oldest first: topped up while the agent keeps calling, none waits until it
    is given back untaken (which would also halve how many are kept)."""
    lim = Limit("global", "usd", "day", 10**9)
    spares = Spares(ledger)
    terms, key = gateway_terms(lim)
    noon = (time.time_ns() // 86_400_000_000_000) * 86_400_000 + 43_200_000
    given_back, served = 0, 0
    for i in range(600):  # a call every 10 ms for 6 s, a refill every 8 calls, the sweep every second
        now = noon + 10 * i
        served += spares.take(key, 1000, 10, now=now) is not None
        spares.want(key, terms, now=now)
        if i % 8 == 7:
            spares.refill(now=now)
        if i % 100 == 99:
            given_back += spares.expire(now=now)
    assert given_back == 0 and served >= 580
    assert spares.held() >= spares.max_per_key // 2  # still as many kept


def test_reservations_made_together_are_all_made_or_none(ledger: Ledger) -> None:
    lim, roomy = Limit("agent:a", "usd", "day", 10_000), Limit("global", "usd", "day", 10**9)
    args = {"agent_id": "a", "role": "w", "usd": 1_000, "tokens": 0, "limits": [roomy, lim], "model": REF}
    with pytest.raises(CharterError) as exc:
        ledger.reserve_many(11, **args)  # the roomy limit is charged first, then the agent's refuses
    assert exc.value.code == BUDGET_EXCEEDED
    assert [u["reserved"] for u in ledger.usage([roomy, lim])] == [0, 0]  # rolled back, both
    with pytest.raises(CharterError):
        ledger.reserve_many(2, **args, headroom=5)  # 2 x 1,000, and 5 times that free after: 12,000
    made = ledger.reserve_many(3, **args, headroom=2)
    assert len({r.id for r in made}) == 3 and ledger.usage([lim])[0]["reserved"] == 3_000
    ledger.settle(made[0].id, usd=400, tokens_in=1, tokens_out=1)  # each settles on its own
    ledger.release(made[1].id)
    usage = ledger.usage([lim])[0]
    assert (usage["committed"], usage["reserved"]) == (400, 1_000)

"""Budgets on model calls: a paid rung is reserved for, settled and shown in the history; over budget
the call degrades to a free rung, and a chain of paid rungs only is refused with a 402 naming what is left.

A daemon killed in the middle of a paid call leaves its reservation to be booked in full at its
expiry. The test home prices the backup (1000 USD per million tokens, i.e. $0.001 a token) and adds two
aliases: `paid_first` = [backup (paid), primary (free)] and `paid_only` = [backup].
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ollama
import openai
import psutil
import pytest

from charter.budget.ledger import Ledger, Limit

from tests.gateway.conftest import Fleet
from tests.gateway.support import (
    APIS,
    BACKUP,
    OPENAI,
    PRIMARY,
    Clients,
    assert_well_formed,
    call_event,
    enroll_key,
    finish,
    space_tokens,
    start,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VARIANTS = [(api, stream) for api in APIS for stream in (False, True)]
IDS = [f"{api}-{'stream' if stream else 'whole'}" for api, stream in VARIANTS]
PER_TOKEN_USD = 1000 / 1e6


@dataclass
class Priced:
    fleet: Fleet
    key: str

    async def limit(self, usd: float) -> None:
        await self.fleet.daemon.admin("PUT", "/v1/admin/budget",
                                      json={"scope": "agent:alpha", "unit": "usd", "period": "day", "limit": usd})

    async def history(self) -> dict[str, dict[str, Any]]:
        doc = await self.fleet.daemon.admin("GET", "/v1/admin/budget/history", params={"by": "model"})
        return {row["model"]: row for row in doc["history"]}


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Priced]:
    fleet = start(tmp_path_factory.mktemp("budget") / "home", probe="1h",
                  prices={BACKUP: (1000.0, 1000.0)},
                  aliases={"paid_first": [BACKUP, PRIMARY], "paid_only": [BACKUP]})
    try:
        yield Priced(fleet, enroll_key(fleet.daemon, "alpha"))
    finally:
        finish(fleet)


@pytest.fixture
async def clients(priced: Priced) -> AsyncIterator[Clients]:
    c = Clients(priced.fleet.daemon.url, priced.key)
    yield c
    await c.close()


async def test_paid_call_settles_and_shows_in_the_history(priced: Priced, clients: Clients) -> None:
    await priced.limit(1.0)
    before = (await priced.history()).get(BACKUP, {"usd_micros": 0, "calls": 0})
    messages = [{"role": "user", "content": "a paid answer, please"}]
    reply = await clients.chat(OPENAI, "paid_first", messages, stream=False, max_tokens=8)
    assert_well_formed(reply)
    ev = await call_event(priced.fleet.daemon, messages)
    assert ev["backend"] == BACKUP and ev["fallbacks"] == []
    tokens = ev["tokens_in"] + ev["tokens_out"]
    assert ev["tokens_out"] <= 8 and reply.prompt_tokens == ev["tokens_in"]
    assert ev["cost_usd"] == pytest.approx(tokens * PER_TOKEN_USD)  # settled on the real usage, not the reservation
    after = (await priced.history())[BACKUP]
    assert after["calls"] == before["calls"] + 1
    assert after["usd_micros"] - before["usd_micros"] == round(tokens * PER_TOKEN_USD * 1e6)


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
async def test_over_budget_the_paid_rung_degrades_to_the_free_one(priced: Priced, clients: Clients, api: str,
                                                                  stream: bool) -> None:
    await priced.limit(0.001)
    messages = [{"role": "user", "content": f"over budget {api} {stream}"}]
    reply = await clients.chat(api, "paid_first", messages, stream=stream)
    assert_well_formed(reply)
    ev = await call_event(priced.fleet.daemon, messages)
    assert ev["error"] is None and ev["backend"] == PRIMARY and ev["cost_usd"] == 0
    assert len(ev["fallbacks"]) == 1
    skipped = ev["fallbacks"][0]
    assert skipped["ref"] == BACKUP and skipped["outcome"] == "skipped"
    assert skipped["reason"].startswith("budget: ") and "left of $0.001" in skipped["reason"]
    if reply.charter is not None:
        assert reply.charter["fallbacks"] == ev["fallbacks"]


@pytest.mark.parametrize(("api", "stream"), VARIANTS, ids=IDS)
async def test_only_paid_rungs_over_budget_is_402(priced: Priced, clients: Clients, api: str, stream: bool) -> None:
    await priced.limit(0.001)
    messages = [{"role": "user", "content": f"paid only {api} {stream}"}]
    if api == OPENAI:
        with pytest.raises(openai.APIStatusError) as caught:
            await clients.chat(api, "paid_only", messages, stream=stream)
        e = caught.value
        assert e.status_code == 402 and e.code == "budget_exceeded" and e.type == "insufficient_quota"
        body: dict[str, Any] = e.body  # type: ignore[assignment]
        message = body["message"]
        assert body["charter"]["refusals"][0]["ref"] == BACKUP
        assert body["charter"]["refusals"][0]["budget"]["hard"] == 1000  # micro-dollars
    else:
        with pytest.raises(ollama.ResponseError) as failed:
            await clients.chat(api, "paid_only", messages, stream=stream)
        assert failed.value.status_code == 402
        message = failed.value.error
    # what the budget was, what is left of it, and what is still free
    assert "day usd budget: asked $" in message and "left of $0.001" in message
    assert "Free models still usable: " in message
    ev = await call_event(priced.fleet.daemon, messages)
    assert ev["backend"] is None and ev["error"] and ev["api"] == api
    assert ev["fallbacks"][0]["reason"].startswith("budget: ")


async def test_a_daemon_killed_mid_call_books_the_whole_reservation_at_its_expiry(tmp_path: Path) -> None:
    """kill -9 while a paid answer streams: the provider may have billed it, so the reservation is
    not given back at its expiry but booked in full, and the cap counts it."""
    fleet = start(tmp_path / "home", probe="1h", prices={BACKUP: (1000.0, 1000.0)}, aliases={"paid_only": [BACKUP]})
    clients = None
    try:
        clients = Clients(fleet.daemon.url, enroll_key(fleet.daemon, "alpha"))
        await fleet.daemon.admin("PUT", "/v1/admin/budget",
                                 json={"scope": "agent:alpha", "unit": "usd", "period": "day", "limit": 1.0})
        await space_tokens(fleet.backup, 0.3)  # a long answer: the daemon dies in the middle of it
        stream = await clients.openai.chat.completions.create(
            model="paid_only", messages=[{"role": "user", "content": "a long paid answer"}], stream=True, max_tokens=40)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first token reached the agent: the call is under way upstream
        os.kill(fleet.daemon.pid, signal.SIGKILL)
        psutil.Process(fleet.daemon.pid).wait(10)
    finally:
        if clients is not None:
            await clients.close()
        finish(fleet)

    db = sqlite3.connect(fleet.home.budget_db_path)
    [(agent, usd, created_at, expires_at, on_expiry)] = db.execute(
        "SELECT agent_id, usd, created_at, expires_at, on_expiry FROM reservations WHERE state = 'held'").fetchall()
    db.close()
    assert on_expiry == "book" and usd > 40 * 1000  # the prompt's bound and 40 output tokens at $0.001
    ledger = Ledger(fleet.home.budget_db_path)
    try:
        assert ledger.sweep(now=expires_at - 1) == 0  # held until its expiry, as long as a call may run
        assert ledger.sweep(now=expires_at) == 1
        [row] = ledger.usage([Limit(f"agent:{agent}", "usd", "day", 1_000_000)], now=created_at)
        assert (row["reserved"], row["committed"]) == (0, usd)
        assert [(h["calls"], h["usd_micros"]) for h in ledger.history(by="model")] == [(1, usd)]
    finally:
        ledger.close()


async def test_a_budget_read_right_after_an_answer_finds_it_booked(priced: Priced, clients: Clients) -> None:
    """A settlement is booked while a later call waits for its backend, or 5 ms after the answer;
    a budget read through the daemon books what is queued first: it never shows an answer already
    delivered as still held, nor its spend as missing."""
    await priced.limit(1.0)
    for i in range(3):
        before = (await priced.history()).get(BACKUP, {"usd_micros": 0, "calls": 0})
        reply = await clients.chat(OPENAI, "paid_only", [{"role": "user", "content": f"read at once {i}"}],
                                   stream=False, max_tokens=8)
        doc = await priced.fleet.daemon.admin("GET", "/v1/admin/budget")  # at once: no poll, no sleep
        (row,) = [r for r in doc["budgets"] if r["name"] == "alpha" and r["unit"] == "usd" and r["period"] == "day"]
        assert row["reserved"] == 0
        after = (await priced.history())[BACKUP]
        assert after["calls"] == before["calls"] + 1
        tokens = reply.prompt_tokens + reply.completion_tokens
        assert after["usd_micros"] - before["usd_micros"] == round(tokens * PER_TOKEN_USD * 1e6)

"""What the ledger books, on SQLite and on PostgreSQL alike: the real use, an overrun included.

`committed` must always be the sum of the `spend` rows, so a budget never reads as within while its
spend is over; a settlement beyond its reservation is an overrun with an alert naming the caps it
crossed; a limit a reservation held nothing of still gets the real use booked; every expired
reservation is swept before a limit is checked, however many leaked, and one made to be booked on
expiry (the gateway's) is booked in full, never given back; a bad limit names its field.
The PostgreSQL runs need the server on 127.0.0.1:5432 (skipped without it, failed under CI=true).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from charter.budget.ledger import BUDGET_EXCEEDED, SWEEP_BATCH, Ledger, Limit
from charter.budget.periods import period_key
from charter.errors import BAD_REQUEST, CONFLICT, CharterError

NOW = 1_800_000_000_000  # a fixed instant (2027-01-15T08:00Z), passed as `now`


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        lg: Any = Ledger(tmp_path / "charter.db")
    else:
        from charter.budget.pg import PgLedger

        lg = PgLedger(request.getfixturevalue("pg_dsn"))
    yield lg
    lg.close()


def spend_total(lg: Any, unit: str = "usd") -> int:
    rows = lg.history(by="day")
    if unit == "usd":
        return sum(int(r["usd_micros"] or 0) for r in rows)
    return sum(int(r["tokens_in"] or 0) + int(r["tokens_out"] or 0) for r in rows)


def usage(lg: Any, lim: Limit) -> dict[str, Any]:
    return lg.usage([lim], now=NOW)[0]


def test_an_overrun_is_booked_in_full_and_names_the_cap_it_crossed(ledger: Any) -> None:
    lim = Limit("global", "usd", "day", 10_000)
    ledger.set_limit(lim)
    within = ledger.reserve(agent_id="a", role="w", usd=4_000, tokens=0, limits=[lim], now=NOW)
    s = ledger.settle(within.id, usd=3_000, tokens_in=0, tokens_out=0, now=NOW)
    assert not s.overrun and s.alerts == []

    # Beyond its own reservation but still under the cap: an overrun, nothing crossed.
    small = ledger.reserve(agent_id="a", role="w", usd=1_000, tokens=0, limits=[lim], now=NOW)
    s = ledger.settle(small.id, usd=2_000, tokens_in=0, tokens_out=0, now=NOW)
    assert s.overrun and s.alerts[0]["kind"] == "overrun" and s.alerts[0]["crossed"] == []
    assert (s.alerts[0]["reserved_usd"], s.alerts[0]["usd"]) == (1_000, 2_000)
    assert usage(ledger, lim)["committed"] == 5_000 == spend_total(ledger)

    # Beyond the cap: booked in full, the budget reads as over, and the alert names the cap.
    big = ledger.reserve(agent_id="a", role="w", usd=5_000, tokens=0, limits=[lim], now=NOW)
    s = ledger.settle(big.id, usd=9_000, tokens_in=0, tokens_out=0, now=NOW)
    assert s.overrun and s.usd == 9_000
    assert [(c["scope"], c["used"], c["hard"], c["over"]) for c in s.alerts[0]["crossed"]] == [
        ("global", 14_000, 10_000, 4_000)]
    use = usage(ledger, lim)
    assert (use["committed"], use["reserved"], use["left"], use["over"]) == (14_000, 0, 0, 4_000)
    assert use["committed"] == spend_total(ledger)  # the books and the spend agree
    assert ledger.history(by="agent")[0]["overruns"] == 2
    with pytest.raises(CharterError) as exc:  # nothing is left, and the refusal says so
        ledger.reserve(agent_id="a", role="w", usd=1, tokens=0, limits=[lim], now=NOW)
    assert exc.value.code == BUDGET_EXCEEDED and exc.value.details["left"] == 0


def test_committed_is_always_the_sum_of_the_spend(ledger: Any) -> None:
    """Random reserves, settles (under and over), releases: committed == SUM(spend) after each step."""
    usd_lim, tok_lim = Limit("global", "usd", "day", 1_000_000), Limit("role:w", "tokens", "day", 1_000_000)
    ledger.set_limit(usd_lim)
    ledger.set_limit(tok_lim)
    rng = random.Random(5)
    for _ in range(60):
        usd, tokens = rng.randint(0, 5_000), rng.randint(0, 500)
        try:
            r = ledger.reserve(agent_id="a", role="w", usd=usd, tokens=tokens, limits=[usd_lim, tok_lim], now=NOW)
        except CharterError:
            continue
        choice = rng.random()
        if choice < 0.2:
            ledger.release(r.id, now=NOW)
        else:
            factor = 1.5 if choice > 0.8 else rng.random()
            t_in = int(tokens * factor) // 2
            ledger.settle(r.id, usd=int(usd * factor), tokens_in=t_in, tokens_out=int(tokens * factor) - t_in, now=NOW)
        assert usage(ledger, usd_lim)["committed"] == spend_total(ledger, "usd")
        assert usage(ledger, tok_lim)["committed"] == spend_total(ledger, "tokens")
        assert usage(ledger, usd_lim)["reserved"] >= 0 and usage(ledger, tok_lim)["reserved"] >= 0


def test_a_limit_that_held_nothing_still_gets_the_real_use(ledger: Any) -> None:
    """A reservation of $0 (a free model) and 0 tokens still books what the call really used."""
    usd_lim, tok_lim = Limit("agent:a", "usd", "day", 100), Limit("agent:a", "tokens", "day", 50)
    r = ledger.reserve(agent_id="a", role="w", usd=0, tokens=0, limits=[usd_lim, tok_lim], now=NOW)
    s = ledger.settle(r.id, usd=0, tokens_in=40, tokens_out=30, now=NOW)
    assert s.overrun
    (crossed,) = s.alerts[0]["crossed"]
    assert (crossed["unit"], crossed["used"], crossed["hard"], crossed["over"]) == ("tokens", 70, 50, 20)
    assert (usage(ledger, tok_lim)["committed"], usage(ledger, usd_lim)["committed"]) == (70, 0)


def test_a_reservation_booked_on_expiry_is_spent_in_full_never_given_back(ledger: Any,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The gateway's reservations: a daemon that died mid-call cannot say what the provider billed,
    so the expiry books the whole reservation; an ordinary one still gives its money back."""
    usd_lim, tok_lim = Limit("global", "usd", "day", 10_000), Limit("global", "tokens", "day", 1_000)
    for lim in (usd_lim, tok_lim):
        ledger.set_limit(lim)
    kept = ledger.reserve(agent_id="a", role="w", usd=4_000, tokens=300, limits=[usd_lim, tok_lim], model="paid/m",
                          ttl_s=1, on_expiry="book", now=NOW)
    ledger.reserve(agent_id="b", role="w", usd=1_000, tokens=100, limits=[usd_lim, tok_lim], ttl_s=1, now=NOW)
    with caplog.at_level("WARNING", logger="charter.budget"):
        assert ledger.sweep(now=NOW + 999) == 0
        assert ledger.sweep(now=NOW + 2 * 86_400_000) == 2  # swept days later (the daemon was down)
    assert [r.getMessage() for r in caplog.records if kept.id in r.getMessage()] == [
        f"reservation {kept.id} (agent a, paid/m) expired unsettled and was booked at its full amount: "
        "$0.004, 300 tokens"]
    assert (usage(ledger, usd_lim)["reserved"], usage(ledger, usd_lim)["committed"]) == (0, 4_000)
    assert (usage(ledger, tok_lim)["reserved"], usage(ledger, tok_lim)["committed"]) == (0, 300)
    assert spend_total(ledger) == 4_000 and spend_total(ledger, "tokens") == 300
    assert ledger.history(by="agent") == [{"agent": "a", "calls": 1, "usd_micros": 4_000, "tokens_in": 300,
                                           "tokens_out": 0, "overruns": 0}]
    # Spent on the day the call was made, where its charges are, not on the day of the sweep.
    assert [h["day"] for h in ledger.history(by="day")] == [period_key("day", NOW, ledger.tz)]
    for close in (lambda: ledger.settle(kept.id, usd=1, tokens_in=1, tokens_out=0, now=NOW + 2_000),
                  lambda: ledger.release(kept.id, now=NOW + 2_000)):
        with pytest.raises(CharterError) as exc:  # a settlement arriving after all is not booked twice
            close()
        assert exc.value.code == CONFLICT and "already settled" in exc.value.message
    # What is left is the cap minus the booking, to the micro-dollar.
    ledger.reserve(agent_id="b", role="w", usd=6_000, tokens=0, limits=[usd_lim], now=NOW + 2_000)
    with pytest.raises(CharterError) as exc:
        ledger.reserve(agent_id="b", role="w", usd=1, tokens=0, limits=[usd_lim], now=NOW + 2_000)
    assert exc.value.code == BUDGET_EXCEEDED
    with pytest.raises(CharterError) as exc:
        ledger.reserve(agent_id="b", role="w", usd=0, tokens=0, limits=[], on_expiry="keep", now=NOW)
    assert (exc.value.code, exc.value.where) == (BAD_REQUEST, "on_expiry") and "'keep'" in exc.value.message


def test_a_refusal_never_counts_expired_reservations_however_many_leaked(ledger: Any) -> None:
    """More expired reservations than one sweep batch: all of them are back before the check."""
    leaked = SWEEP_BATCH * 2 + 37
    lim = Limit("global", "usd", "day", leaked * 10)
    ledger.set_limit(lim)
    for _ in range(leaked):
        ledger.reserve(agent_id="crashed", role="w", usd=10, tokens=0, limits=[lim], ttl_s=1, now=NOW)
    with pytest.raises(CharterError):  # still held: nothing left
        ledger.reserve(agent_id="b", role="w", usd=10, tokens=0, limits=[lim], now=NOW + 999)
    whole = ledger.reserve(agent_id="b", role="w", usd=leaked * 10, tokens=0, limits=[lim], now=NOW + 1000)
    use = usage(ledger, lim)
    assert (use["reserved"], use["left"]) == (leaked * 10, 0)
    ledger.release(whole.id, now=NOW + 1000)
    for _ in range(leaked):
        ledger.reserve(agent_id="crashed", role="w", usd=10, tokens=0, limits=[lim], ttl_s=1, now=NOW + 2000)
    assert ledger.sweep(now=NOW + 3000) == leaked  # an explicit sweep returns them all too
    assert usage(ledger, lim)["reserved"] == 0


@pytest.mark.parametrize(("limit", "where", "named"), [
    (Limit("global", "dollars", "day", 1), "unit", "'dollars'"),
    (Limit("global", "usd", "week", 1), "period", "'week'"),
    (Limit("team:x", "usd", "day", 1), "scope", "'team:x'"),
    (Limit("role:", "usd", "day", 1), "scope", "'role:'"),
    (Limit("global", "usd", "day", -5), "limit", "-5"),
    (Limit("global", "usd", "day", 1, 1.5), "soft_ratio", "1.5"),
])
def test_a_bad_limit_names_the_field_and_the_value(ledger: Any, limit: Limit, where: str, named: str) -> None:
    with pytest.raises(CharterError) as exc:
        ledger.set_limit(limit)
    assert exc.value.code == BAD_REQUEST and exc.value.where == where and named in exc.value.message
    if where in ("unit", "period", "scope"):
        with pytest.raises(CharterError) as exc:
            ledger.remove_limit(limit.scope, limit.unit, limit.period)
        assert exc.value.where == where and named in exc.value.message

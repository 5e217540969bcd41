"""`Ledger.settle_batch` books a batch of the usual settlements in a few statements (`_settle_plain`)
and any other batch item by item. Whichever way, the books are exactly those that settling each
reservation on its own (`Ledger.settle`) would have written: the usage, the reservations' states,
the spend rows and their overrun flags, each settlement's result."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charter.budget.ledger import Ledger, Limit, SettleItem, Settlement

NOW = 1_790_000_000_000  # ms; every reservation and settlement of an example at this time (one day)
LIMITS = [Limit("global", "usd", "day", 10**12), Limit("agent:a", "usd", "day", 10**12),
          Limit("agent:a", "tokens", "day", 10**9)]

# One settlement: which reservation (an index; out of range means an unknown id), and what it
# books: the whole reservation, part of it, nothing, more usd or more tokens than it holds (an
# overrun), or with another agent's name (unknown to it) or none.
KINDS = {"whole": (1, 1, "a"), "part": (0.5, 0.3, "a"), "nothing": (0, 0, "a"), "no_owner": (1, 0.3, None),
         "over_usd": (1.2, 1, "a"), "over_tokens": (1, 1.5, "a"), "other_owner": (0.5, 0.3, "b")}
PLAIN_KINDS = ["whole", "part", "nothing", "no_owner"]
FAULTY_KINDS = ["over_usd", "over_tokens", "other_owner"]


@st.composite
def example(draw: st.DrawFn) -> tuple[Any, Any, Any, Any]:
    """A batch with no fault (the few-statements path), with exactly one (the fallback, which
    must give the same books), or anything at all."""
    sizes = draw(st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 300)), min_size=1, max_size=6))
    n = len(sizes)
    mode = draw(st.sampled_from(["clean", "one_fault", "one_fault", "any"]))
    released: set[int] = set()  # released before the batch
    expired: set[int] = set()  # expired (swept) before the batch
    if mode == "any":
        indices = draw(st.lists(st.integers(0, n), min_size=1, max_size=8))  # n: an unknown reservation
        kinds = draw(st.lists(st.sampled_from(PLAIN_KINDS + FAULTY_KINDS), min_size=len(indices),
                              max_size=len(indices)))
        released = draw(st.sets(st.integers(0, n - 1), max_size=1))
        expired = draw(st.sets(st.integers(0, n - 1), max_size=1))
        return sizes, list(zip(indices, kinds, strict=True)), released, expired
    indices = list(draw(st.permutations(list(range(n)))))
    kinds = draw(st.lists(st.sampled_from(PLAIN_KINDS), min_size=n, max_size=n))
    if mode == "one_fault":
        fault = draw(st.sampled_from(["kind", "released", "expired", "repeated", "unknown"]))
        at = draw(st.integers(0, n - 1))
        if fault == "kind":
            kinds[at] = draw(st.sampled_from(FAULTY_KINDS))
        elif fault == "released":
            released = {indices[at]}
        elif fault == "expired":
            expired = {indices[at]}
        else:
            indices.append(indices[at] if fault == "repeated" else n)
            kinds.append(draw(st.sampled_from(PLAIN_KINDS)))
    return sizes, list(zip(indices, kinds, strict=True)), released, expired


def books(ledger: Ledger) -> dict[str, Any]:
    db = ledger._db
    return {
        "usage": db.execute("SELECT * FROM budget_usage ORDER BY 1, 2, 3, 4").fetchall(),
        "reservations": db.execute("SELECT id, state, closed_at FROM reservations ORDER BY id").fetchall(),
        "spend": db.execute("SELECT reservation_id, agent_id, role, model, usd, tokens_in, tokens_out, ts, day, overrun "
                            "FROM spend ORDER BY id").fetchall(),
    }


def outcome(result: Settlement | Exception) -> Any:
    if isinstance(result, Exception):
        return type(result).__name__, str(result)
    return result.reservation_id, result.usd, result.tokens, result.overrun, result.late, result.alerts


PLAIN = {"batches": 0}  # batches the few-statements path booked, across the examples


def test_a_batch_books_what_settling_each_alone_books() -> None:
    PLAIN["batches"] = 0
    same_books_as_alone()
    assert PLAIN["batches"] >= 20  # the property did exercise the few-statements path, not only the fallback


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(example())
def same_books_as_alone(ex: tuple[Any, Any, Any, Any]) -> None:
    sizes, batch, released, expired = ex
    later = NOW + 2_000
    with tempfile.TemporaryDirectory() as tmp:
        twins = [Ledger(Path(tmp) / f"{name}.db") for name in ("batch", "alone")]
        try:
            ids: list[list[str]] = []
            for ledger in twins:
                made = [ledger.reserve(agent_id="a", role="w", usd=usd, tokens=tok, limits=LIMITS, model="m",
                                       ttl_s=1 if i in expired else 600, now=NOW).id
                        for i, (usd, tok) in enumerate(sizes)]
                ids.append(made)
                for i in sorted(released):
                    if i < len(made):
                        ledger.release(made[i], now=NOW)
                ledger.sweep(now=later)  # the expired ones: their money is back, a settlement is late
            results = []
            for ledger, made in zip(twins, ids, strict=True):
                items = []
                for index, kind in batch:
                    usd_share, tok_share, owner = KINDS[kind]
                    rid = made[index] if index < len(made) else f"res_unknown{index}"
                    usd, tok = sizes[index] if index < len(sizes) else (100, 10)
                    t = int(tok * tok_share)
                    items.append(SettleItem(rid, int(usd * usd_share), t - t // 3, t // 3, owner))
                if ledger is twins[0]:
                    plain = ledger._settle_plain

                    def counted(*args: Any) -> Any:
                        got = plain(*args)
                        PLAIN["batches"] += got is not None
                        return got

                    ledger._settle_plain = counted  # type: ignore[method-assign]
                    results.append([outcome(r) for r in ledger.settle_batch(items, now=later)])
                else:
                    alone = []
                    for it in items:
                        try:
                            alone.append(outcome(ledger.settle(it.reservation_id, usd=it.usd, tokens_in=it.tokens_in,
                                                               tokens_out=it.tokens_out, agent_id=it.agent_id,
                                                               now=later)))
                        except Exception as exc:  # noqa: BLE001 - compared with the batch's result
                            alone.append(outcome(exc))
                    results.append(alone)
            rename = dict(zip(ids[1], ids[0], strict=True))  # the twins' ids differ: compare by position
            alone_books = books(twins[1])
            alone_books["reservations"] = sorted((rename[r], s, c) for r, s, c in alone_books["reservations"])
            alone_books["spend"] = [(rename.get(r, r), *rest) for r, *rest in alone_books["spend"]]
            batch_books = books(twins[0])
            batch_books["reservations"] = sorted(batch_books["reservations"])
            assert batch_books == alone_books
            assert results[0] == [_renamed(o, rename) for o in results[1]]
        finally:
            for ledger in twins:
                ledger.close()


def _renamed(o: Any, rename: dict[str, str]) -> Any:
    if isinstance(o[1], str):  # an exception: its message names the reservation
        msg = o[1]
        for old, new in rename.items():
            msg = msg.replace(old, new)
        return o[0], msg
    return (rename.get(o[0], o[0]), *o[1:-1], [{k: rename.get(v, v) if isinstance(v, str) else v
                                                 for k, v in a.items()} for a in o[-1]])


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "b.db")
    yield opened
    opened.close()


def held(ledger: Ledger, n: int) -> list[str]:
    return [ledger.reserve(agent_id="a", role="w", usd=1_000, tokens=100, limits=LIMITS, now=NOW).id
            for _ in range(n)]


def states(ledger: Ledger, ids: list[str]) -> list[str]:
    found = dict(ledger._db.execute("SELECT id, state FROM reservations").fetchall())
    return [found[r] for r in ids]


def test_the_usual_batch_takes_a_few_statements_not_a_few_per_item(ledger: Ledger) -> None:
    made = held(ledger, 8)
    statements: list[str] = []
    ledger._db.set_trace_callback(statements.append)
    out = ledger.settle_batch([SettleItem(rid, 400, 20, 10, "a") for rid in made], now=NOW)
    ledger._db.set_trace_callback(None)
    assert all(isinstance(r, Settlement) and not r.overrun for r in out)
    usage_writes = [s for s in statements if s.startswith("UPDATE budget_usage")]
    assert len(usage_writes) == len(LIMITS)  # one per limit with the batch's sums, not one per item and limit
    assert not any(s.startswith("SAVEPOINT item") for s in statements)
    usage = {(u["scope"], u["unit"]): (u["reserved"], u["committed"]) for u in ledger.usage(LIMITS, now=NOW)}
    assert usage == {("global", "usd"): (0, 3_200), ("agent:a", "usd"): (0, 3_200), ("agent:a", "tokens"): (0, 240)}


def test_an_amount_sqlite_cannot_hold_is_refused_alone(ledger: Ledger) -> None:
    made = held(ledger, 3)
    items = [SettleItem(made[0], 10, 1, 1, "a"), SettleItem(made[1], 2**70, 1, 1, "a"), SettleItem(made[2], 10, 1, 1)]
    out = ledger.settle_batch(items, now=NOW)
    assert isinstance(out[1], OverflowError)  # booked as an overrun, item by item: refused alone
    assert isinstance(out[0], Settlement) and isinstance(out[2], Settlement)
    assert states(ledger, made) == ["settled", "held", "settled"]


def test_a_reservation_whose_record_cannot_be_read_is_refused_alone(ledger: Ledger) -> None:
    made = held(ledger, 3)
    ledger._db.execute("UPDATE reservations SET charges = 'not json' WHERE id = ?", (made[1],))
    out = ledger.settle_batch([SettleItem(rid, 10, 1, 1, "a") for rid in made], now=NOW)
    assert isinstance(out[0], Settlement) and isinstance(out[1], Exception) and isinstance(out[2], Settlement)
    assert states(ledger, made) == ["settled", "held", "settled"]

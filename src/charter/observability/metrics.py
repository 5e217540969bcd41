"""Prometheus metrics at `/metrics`.

Most values are read from the parts at scrape time (a custom collector), so the hot paths pay
nothing: bus accept/refuse counters, circuit states, budgets used and left, archive lag. Only the
gateway's per-call counters and latency are recorded as calls finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from charter.node import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}
BUDGET_READ_WAIT = 2.0  # seconds a scrape waits for the budget rows before it answers without them
log = logging.getLogger("charter.metrics")


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.budget_rows: list[dict[str, Any]] | None = None  # read beforehand, off the loop (`Metrics.scrape`)
        self.budget_read = True  # False: the ledger did not answer in time; the budget gauges are left out

    def collect(self) -> Iterator[Any]:
        node = self.node
        bus = CounterMetricFamily("charter_bus_messages", "Envelopes accepted or refused by the bus, by code",
                                  labels=["result", "code"])
        for code, n in node.counters.items():
            bus.add_metric(["accepted" if code == "accepted" else "refused", "" if code == "accepted" else code], n)
        yield bus

        head = GaugeMetricFamily("charter_log_head_seq", "Sequence number of the last entry in the bus log")
        head.add_metric([], node.log.head_sync()[0])
        yield head

        agents = GaugeMetricFamily("charter_agents", "Enrolled agents by status", labels=["status"])
        counts: dict[str, int] = {"active": 0, "suspended": 0, "revoked": 0}
        for a in node.registry.all():
            counts[a.status] = counts.get(a.status, 0) + 1
        for status, n in counts.items():
            agents.add_metric([status], n)
        yield agents

        circuit = GaugeMetricFamily("charter_gateway_circuit_state",
                                    "Circuit per backend: 0 closed, 1 half-open, 2 open", labels=["backend"])
        for name, br in node.gateway.router.breakers.items():
            circuit.add_metric([name], CIRCUIT.get(br.state, 2))
        yield circuit

        used = GaugeMetricFamily("charter_budget_used", "Committed plus reserved in the current period",
                                 labels=["scope", "unit", "period"])
        left = GaugeMetricFamily("charter_budget_left", "What is left in the current period",
                                 labels=["scope", "unit", "period"])
        agents = node.registry.all()
        names = {f"agent:{a.id}": f"agent:{a.name}" for a in agents}
        rows = self.budget_rows if self.budget_rows is not None else node.gov.budget_rows(agents)
        for row in rows:
            scale = 1e6 if row["unit"] == "usd" else 1
            labels = [names.get(row["scope"], row["scope"]), row["unit"], row["period"]]
            used.add_metric(labels, (row["committed"] + row["reserved"]) / scale)
            left.add_metric(labels, row["left"] / scale)
        yield used
        yield left
        readable = GaugeMetricFamily("charter_budget_read_ok",
                                     "1 if this scrape read the budget ledger; 0 if it did not answer in time "
                                     "(the budget gauges are then absent)")
        readable.add_metric([], 1 if self.budget_read else 0)
        yield readable

        pending = GaugeMetricFamily("charter_approvals_pending", "Approval requests waiting for the operator")
        pending.add_metric([], len(node.gov.approvals.list("pending")))
        yield pending

        archivist = getattr(node, "archivist", None)
        if archivist is not None:
            st = archivist.state()
            lag = GaugeMetricFamily("charter_archive_lag_entries", "Log entries not yet sealed into the archive")
            lag.add_metric([], max(head.samples[0].value - (st.get("archived_seq") or 0), 0))
            yield lag
            ok = GaugeMetricFamily("charter_archive_verified", "1 if the last archive verification passed")
            ok.add_metric([], 1 if st.get("verified") else 0)
            yield ok

        for extra in node.metric_sources:
            yield from extra()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a read's failure seen when every scrape waiting on it gave up: the next scrape reads
    again, and says why if that one fails too."""
    if not future.cancelled():
        future.exception()


def split_ref(ref: str | None) -> tuple[str, str]:
    """`backend/model` as two labels, so every gateway family shares the circuit's `backend` values
    (a model name may itself hold a slash; `degraded` has no model)."""
    backend, _, model = (ref or "").partition("/")
    return backend, model


class Metrics:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _NodeCollector(node)
        self.registry.register(self._collector)
        self.gateway_requests = Counter(
            "charter_gateway_requests",
            "Gateway calls by the backend and model that answered, and outcome (error: none completed the call)",
            ["backend", "model", "outcome"], registry=self.registry)
        self.gateway_fallbacks = Counter("charter_gateway_fallbacks", "Rungs skipped or failed, by backend, model and why",
                                         ["backend", "model", "reason"], registry=self.registry)
        self.gateway_latency = Histogram("charter_gateway_latency_seconds",
                                         "Gateway call latency by the backend and model that answered",
                                         ["backend", "model"], registry=self.registry,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        # Each call's children, kept per (ref, ok): `labels()` takes a lock and builds its key every
        # time. This grows as prometheus_client's own children for those labels do, no faster.
        self._call_children: dict[tuple[str | None, bool], tuple[Any, Any]] = {}
        self._budget_read: asyncio.Future[list[dict[str, Any]]] | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """`render` for the event loop: the budget rows, from a ledger that may be across the
        network, are read first and off the loop; the rest is in memory or local. A ledger that
        does not answer within `BUDGET_READ_WAIT` leaves the budget gauges out of this scrape
        (`charter_budget_read_ok` 0) rather than failing it or holding it past Prometheus' timeout."""
        rows = await self._read_budget()
        self._collector.budget_rows, self._collector.budget_read = (rows or [], rows is not None)
        try:
            return self.render()
        finally:
            self._collector.budget_rows, self._collector.budget_read = None, True

    async def _read_budget(self) -> list[dict[str, Any]] | None:
        """The budget rows, or None if the ledger failed or did not answer in time. One read at a
        time: scrapes during a stall share the read in flight instead of queueing more behind it."""
        if self._budget_read is None or self._budget_read.done():
            self._budget_read = asyncio.ensure_future(self.node.gov.budget_overview(self.node.registry.all()))
            self._budget_read.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(self._budget_read), BUDGET_READ_WAIT)
        except TimeoutError:
            log.warning("the budget ledger did not answer within %gs; this scrape has no budget gauges",
                        BUDGET_READ_WAIT)
        except Exception as exc:  # noqa: BLE001 - the other gauges are still worth answering with
            log.warning("could not read the budget ledger for /metrics (%s: %s)", type(exc).__name__, exc)
        return None

    def call(self, ref: str | None, ok: bool, seconds: float, attempts: list[dict[str, Any]]) -> None:
        """One finished gateway call. `ref` is the `backend/model` that answered; a call that no
        backend completed has none, and counts as `outcome="error"` with empty backend and model
        (Prometheus reads an empty label as absent) rather than under an invented backend."""
        children = self._call_children.get((ref, ok))
        if children is None:
            backend, model = split_ref(ref)
            children = self._call_children[(ref, ok)] = (
                self.gateway_requests.labels(backend, model, "ok" if ok else "error"),
                self.gateway_latency.labels(backend, model))
        children[0].inc()
        children[1].observe(seconds)
        for a in attempts:
            if a.get("outcome") != "ok":
                reason = str(a.get("reason", "")).split(":", 1)[0].split(" (", 1)[0][:40]
                self.gateway_fallbacks.labels(*split_ref(str(a.get("ref", ""))), reason).inc()

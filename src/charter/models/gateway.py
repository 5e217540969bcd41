"""The gateway as the daemon runs it: identity, policy and budget on every call, and an event for each.

`CallGovernor` is asked before each rung of a chain: is this model allowed for this agent (policy
action `model.call`, paid models are T2), and does the budget hold the most it could cost (reserved
from the request's maximum tokens)? A refused paid rung is skipped so the call degrades to the free
ones. After the call, the real usage is settled and one event records the agent, alias, backend,
each fallback and why, tokens, cost and latency, with hashes of prompt and answer by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charter.budget.ledger import BUDGET_EXCEEDED
from charter.budget.prices import FREE, MICRO, Price
from charter.encoding import canonical, sha256_hex
from charter.errors import CharterError
from charter.identity.registry import AgentRecord
from charter.models.router import CallResult, Router, Skip
from charter.models.types import ChatRequest, Final

if TYPE_CHECKING:
    from charter.node import Node


@dataclass(slots=True)
class Admission:
    ref: str
    price: Price
    reservation_id: str | None
    reserved_usd: int
    prompt_estimate: int


class CallGovernor:
    """Policy and budget for one call, rung by rung."""

    def __init__(self, gateway: Gateway, agent: AgentRecord, alias: str) -> None:
        self.gw, self.agent, self.alias = gateway, agent, alias
        self.usd = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.refusals: list[dict[str, Any]] = []

    def price(self, ref: str, kind: str) -> Price:
        prices = self.gw.node.gov.prices
        try:
            return prices.price(ref)
        except KeyError:
            if kind in ("ollama", "degraded"):
                return FREE
            raise Skip(f"no price for {ref}: add it under [prices] to allow paid calls") from None

    async def admit(self, ref: str, kind: str, model: str, req: ChatRequest) -> Admission:
        gov = self.gw.node.gov
        price = self.price(ref, kind)
        backend = ref.split("/", 1)[0]
        attrs = {"provider": kind, "backend": backend, "model": model, "alias": self.alias,
                 "paid": price != FREE}
        d = gov.evaluate(self.agent, "model.call", attrs)
        if not d.allowed:
            why = "needs an approval" if d.effect == "approve" else d.reason
            self.refusals.append({"ref": ref, "policy": d.to_dict()})
            raise Skip(f"policy: {why}")
        if kind == "degraded":  # Charter's own answer: the policy decides, there is nothing to reserve
            return Admission(ref, FREE, None, 0, 0)
        max_out = req.max_tokens if req.max_tokens is not None else self.gw.config.default_max_tokens
        est_in = req.estimated_prompt_tokens()
        usd = price.cost_micros(est_in, max_out)
        limits = gov.limits_for(self.agent)
        if not limits:
            return Admission(ref, price, None, 0, est_in)
        try:
            res = gov.ledger.reserve(agent_id=self.agent.id, role=self.agent.role, usd=usd, tokens=est_in + max_out,
                                     limits=limits, model=ref, action="model.call",
                                     ttl_s=self.gw.node.config.models.timeouts.total + 60)
        except CharterError as err:
            if err.code != BUDGET_EXCEEDED:
                raise
            reason = err.message.replace(f"agent:{self.agent.id} ", f"{self.agent.name}'s ")
            self.refusals.append({"ref": ref, "budget": err.details or {}, "reason": reason})
            raise Skip(f"budget: {reason}") from None
        for alert in res.alerts:
            await self.gw.node.emit("charter.budget.alerts", {"agent_id": self.agent.id, "name": self.agent.name, **alert})
        return Admission(ref, price, res.id, usd, est_in)

    async def settle(self, adm: Admission, final: Final | None, text: str) -> None:
        if final is not None and (final.prompt_tokens or final.completion_tokens):
            t_in, t_out = final.prompt_tokens, final.completion_tokens
        else:  # a broken stream reports no usage: count what was delivered
            t_in, t_out = adm.prompt_estimate, max(len(text.split()), 1 if text else 0)
        usd = adm.price.cost_micros(t_in, t_out)
        self.tokens_in += t_in
        self.tokens_out += t_out
        if adm.reservation_id:
            s = self.gw.node.gov.ledger.settle(adm.reservation_id, usd=usd, tokens_in=t_in, tokens_out=t_out,
                                               agent_id=self.agent.id)
            usd = min(usd, adm.reserved_usd) if not s.overrun else usd
        self.usd += usd

    async def release(self, adm: Admission) -> None:
        if adm.reservation_id:
            self.gw.node.gov.ledger.release(adm.reservation_id, agent_id=self.agent.id)


class Gateway:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config.models
        self.router = Router(self.config, on_health=self._health_event)

    def start(self) -> None:
        self.router.start_probes()

    async def close(self) -> None:
        await self.router.close()

    async def _health_event(self, backend: str, state: str, reason: str) -> None:
        await self.node.emit("charter.models.health", {"backend": backend, "state": state, "reason": reason})

    def governor(self, agent: AgentRecord, alias: str) -> CallGovernor:
        return CallGovernor(self, agent, alias)

    async def record(self, agent: AgentRecord, api: str, alias: str, req: ChatRequest, gov: CallGovernor,
                     result: CallResult | None, started: float, *, stream: bool, error: str | None = None,
                     attempts: list[Any] | None = None) -> None:
        """One event per call on `charter.models.calls`."""
        tries = result.attempts if result else (attempts or [])
        payload: dict[str, Any] = {
            "agent_id": agent.id, "name": agent.name, "api": api, "alias": alias, "stream": stream,
            "backend": result.ref if result else None,
            "degraded": bool(result and result.degraded),
            "attempts": [a.to_dict() for a in tries],
            "fallbacks": [a.to_dict() for a in tries if a.outcome != "ok"],
            "continued_after": result.continued_after if result else [],
            "tokens_in": gov.tokens_in, "tokens_out": gov.tokens_out,
            "cost_usd": gov.usd / MICRO, "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "prompt_sha256": sha256_hex(canonical(req.messages)),
            "answer_sha256": sha256_hex(result.text.encode()) if result else None,
            "error": error,
        }
        if self.config.log_content:
            payload["prompt"] = req.messages
            payload["answer"] = result.text if result else None
        self.node.metrics.call(payload["backend"], error is None, time.perf_counter() - started, payload["attempts"])
        await self.node.emit("charter.models.calls", payload)

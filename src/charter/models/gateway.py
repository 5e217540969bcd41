"""The gateway as the daemon runs it: identity, policy and budget on every call, and an event for each.

`CallGovernor` is asked before each rung of a chain: is this model allowed for this agent (policy
action `model.call`, paid models are T2, with the estimated `amount_usd` for amount rules), is the
tier's per-action cap kept, and does the budget hold the most it could cost? It goes through
`Governance.admit_spend`, the same checks as the reserve API. A refused paid rung is skipped so the
call degrades to the free ones. After the call, the real usage is settled (booked a moment later, with
other calls', while a later call waits for its backend: see charter.budget.deferred) and one event records the
agent, alias, backend, each rung's decision, each fallback and why, tokens, cost and latency, with
hashes of prompt and answer by default.

What is reserved bounds what can be spent:
* output: when a budget applies, a request without a maximum is given `default_max_tokens`, and
  that limit is what the backend is sent (`num_predict` / `max_tokens`), so it cannot generate more
  than was reserved (with no budget in play the request keeps its own limit, or none);
* prompt: `prompt_token_bound`, one token per UTF-8 byte of the messages plus a chat template's
  overhead, an upper bound for byte-level tokenizers (a token covers at least one byte).
Should the backend still report more than was reserved, the real usage is booked anyway and an
overrun alert is published (see charter.budget.ledger): the books never read as within while
the spend is over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charter.budget.ledger import BUDGET_EXCEEDED
from charter.budget.prices import FREE, MICRO, Price
from charter.encoding import canonical, sha256_hex
from charter.governance import APPROVAL_REQUIRED, SpendRefused
from charter.identity.registry import AgentRecord
from charter.models.router import CallResult, Router, Skip
from charter.models.types import ChatRequest, Final

if TYPE_CHECKING:
    from charter.node import Node



PER_MESSAGE_TOKENS = 8  # a chat template's role header and end-of-turn markers, per message
TEMPLATE_TOKENS = 32  # begin-of-text, the assistant's header, a default system prompt some templates add


def prompt_token_bound(req: ChatRequest) -> int:
    """An upper bound on the prompt's tokens, for the reservation: what is reserved must not be short.

    Byte-level BPE and SentencePiece with byte fallback never make more tokens than UTF-8 bytes, so
    the bytes of every message (role and text; a non-text part by its JSON) bound the text, and a
    fixed allowance per message and per call bounds the template around it.
    """
    total = TEMPLATE_TOKENS
    for m in req.messages:
        total += PER_MESSAGE_TOKENS + len(str(m.get("role", "")).encode())
        c = m.get("content")
        if isinstance(c, str):
            total += len(c.encode())
        elif c is not None:
            total += len(canonical(c))
    return total


@dataclass(slots=True)
class Admission:
    ref: str
    price: Price
    reservation_id: str | None
    reserved_usd: int
    prompt_estimate: int
    max_out: int = 0


class CallGovernor:
    """Policy and budget for one call, rung by rung."""

    def __init__(self, gateway: Gateway, agent: AgentRecord, alias: str) -> None:
        self.gw, self.agent, self.alias = gateway, agent, alias
        self.usd = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.refusals: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []  # one per rung asked: published in the call event

    def price(self, ref: str, kind: str) -> Price:
        prices = self.gw.node.gov.prices
        try:
            return prices.price(ref)
        except KeyError:
            if kind in ("ollama", "degraded"):
                return FREE
            raise Skip(f"no price for {ref}: add it under [prices] to allow paid calls") from None

    async def admit(self, ref: str, kind: str, model: str, req: ChatRequest) -> Admission:
        """Decide and reserve for one rung; raises Skip with the reason when it may not be used.

        When a reservation is made, a request without a maximum is given `default_max_tokens`: the
        reservation is sized on it and the backend is sent it, so the answer cannot outgrow it.
        """
        gov = self.gw.node.gov
        price = self.price(ref, kind)
        backend = ref.split("/", 1)[0]
        degraded = kind == "degraded"
        if degraded:  # Charter's own answer: the policy decides, there is nothing to reserve
            est_in = max_out = usd = 0
        else:
            max_out = req.max_tokens if req.max_tokens is not None else self.gw.config.default_max_tokens
            est_in = prompt_token_bound(req)
            usd = price.cost_micros(est_in, max_out)
        attrs = {"provider": kind, "backend": backend, "model": model, "alias": self.alias,
                 "paid": price != FREE, "amount_usd": usd / MICRO, "tokens": est_in + max_out}
        try:
            # Held until settled; if this daemon dies first, the call may have been billed, so its
            # expiry books the whole reservation rather than giving it back.
            spend = await gov.admit_spend_async(self.agent, "model.call", attrs, usd=usd, tokens=est_in + max_out,
                                                model=ref, ttl_s=self.gw.node.config.models.timeouts.total + 60,
                                                reserve=False if degraded else None, on_expiry="book",
                                                spare=not degraded)
        except SpendRefused as err:
            d = err.decision
            if err.code == BUDGET_EXCEEDED:
                self.decisions.append({"ref": ref, "effect": "deny", "rule": d.rule, "tier": d.tier,
                                       "reason": err.message, "code": err.code})
                self.refusals.append({"ref": ref, "budget": err.details or {}, "reason": err.message})
                raise Skip(f"budget: {err.message}") from None
            why = "needs an approval" if err.code == APPROVAL_REQUIRED else err.message
            self.decisions.append({"ref": ref, "effect": d.effect, "rule": d.rule, "tier": d.tier, "reason": why,
                                   "code": err.code})
            self.refusals.append({"ref": ref, "policy": d.to_dict()})
            raise Skip(f"policy: {why}") from None
        d = spend.decision
        res = spend.reservation
        entry = {"ref": ref, "effect": d.effect, "rule": d.rule, "tier": d.tier}
        try:
            if spend.approval is not None:  # let through by an approval: rare, and published on its own as
                entry["approval_id"] = spend.approval.id  # every approved run is (the T3 audit reads those)
                await gov.publish_decision(self.agent, "model.call", d, approval_id=spend.approval.id, ref=ref)
            if res is not None:
                await gov.publish_alerts(self.agent, res.alerts)
        except BaseException:  # nothing was sent upstream: the money goes back, not to its expiry's booking
            if res is not None:
                await gov.give_back(res.id, self.agent.id)
            raise
        self.decisions.append(entry)
        if not degraded:  # what earlier calls left to book and write is done while this one waits
            self.gw.node.backend_call_ahead()
        if res is None:  # no budget applies: the request keeps its own limit, or none
            return Admission(ref, price if not degraded else FREE, None, 0, est_in, max_out)
        if req.max_tokens is None:  # the reservation is sized on this: the backend must not outgrow it
            req.max_tokens = max_out
        return Admission(ref, price, res.id, usd, est_in, max_out)

    async def settle(self, adm: Admission, final: Final | None, text: str) -> None:
        """Book the real usage; without it (a broken stream) an upper bound of what was delivered.

        The reservation stays held until the settlement is booked, a moment later."""
        if final is not None and (final.prompt_tokens or final.completion_tokens):
            t_in, t_out = final.prompt_tokens, final.completion_tokens
        else:  # no usage reported: the prompt's bound, and at most a token per delivered byte
            t_in = adm.prompt_estimate
            t_out = len(text.encode())
            if adm.max_out:
                t_out = min(t_out, adm.max_out)
        usd = adm.price.cost_micros(t_in, t_out)
        self.tokens_in += t_in
        self.tokens_out += t_out
        self.usd += usd
        if adm.reservation_id:  # booked a moment after the answer (budget/deferred.py)
            self.gw.node.gov.settlements.add(self.agent, adm.reservation_id, usd=usd, tokens_in=t_in,
                                             tokens_out=t_out)

    async def release(self, adm: Admission) -> None:
        """Nothing was spent on this rung: its reservation goes back, even if the call is being
        cancelled meanwhile (left held, its expiry would book all of it)."""
        if adm.reservation_id:
            await self.gw.node.gov.give_back(adm.reservation_id, self.agent.id)


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
        """One event per call on `charter.models.calls`, queued: it is signed and appended with
        others a moment later (`Node.emit_soon`), so no answer waits for it and a failure to write
        it is logged for the operator, never turned into the agent's error."""
        tries = result.attempts if result else (attempts or [])
        payload: dict[str, Any] = {
            "agent_id": agent.id, "name": agent.name, "api": api, "alias": alias, "stream": stream,
            "backend": result.ref if result else None,
            "degraded": bool(result and result.degraded),
            "attempts": [a.to_dict() for a in tries],
            "decisions": gov.decisions,
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
        self.node.emit_soon("charter.models.calls", payload)

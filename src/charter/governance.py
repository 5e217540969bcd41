"""Governance: the bound policy decides, approvals wait for the operator, budgets are never crossed.

The Node owns one of these. Every decision about an action, every approval step and every budget
refusal or alert becomes an event on the bus, signed by the operator's root key.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from charter.budget.deferred import DeferredSettlements
from charter.budget.handoff import ReservationHandoff, release_quietly, warn_unreleased
from charter.budget.ledger import BUDGET_EXCEEDED, Limit, Reservation
from charter.budget.store import open_ledger
from charter.budget.threads import LedgerThreads
from charter.budget.prices import FREE, MICRO, Price, PriceTable
from charter.budget.spares import Spares
from charter.bus.deferred import DELAY as BOOKKEEPING_DELAY
from charter.bus.envelope import Envelope
from charter.bus.log.base import Receipt
from charter.bus.subjects import SubjectError, validate_pattern
from charter.config import Config, Home
from charter.errors import BAD_REQUEST, NOT_FOUND, POLICY_DENIED, CharterError
from charter.identity.keys import PublicKey
from charter.identity.registry import OPERATOR_ID, AgentRecord
from charter.policy.approvals import APPROVED, Approval, Approvals, verify_decision
from charter.policy.engine import ALLOW, APPROVE, DENY, TIERS, Decision, Subject
from charter.policy.store import Policy, PolicyVersions, load_policies

APPROVAL_REQUIRED = "approval_required"
OPERATOR_DECISION = Decision(ALLOW, "operator", "T3", "the operator acts with the root key")
Emit = Callable[[str, Any], Awaitable[Receipt]]
T = TypeVar("T")
CLOSE_WAIT = 10.0  # seconds closing waits for ledger calls still running on threads (a row lock, a release)


def _now() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Spend:
    """An admitted spend: the decision, its reservation (None if none was taken), the approval it used."""

    decision: Decision
    reservation: Reservation | None
    usd: int
    approval: Approval | None = None


class SpendRefused(CharterError):
    """A spend refused by policy, for want of an approval, or by a budget; carries the decision."""

    def __init__(self, code: str, message: str, where: str | None, decision: Decision,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(code, message, where)
        self.decision = decision
        self.details = details


class Governance:
    def __init__(self, home: Home, config: Config, emit: Emit, root_public: PublicKey) -> None:
        self.config = config
        self.emit = emit
        self.root_public = root_public
        self.current: dict[str, Policy] = load_policies(home.policies_dir)
        self.versions = PolicyVersions(home.db_path)
        for p in self.current.values():
            self.versions.remember(p)
        self.by_hash: dict[str, Policy] = self.versions.load_all(home.policies_dir)
        self.approvals = Approvals(home.db_path, synchronous=config.bus.synchronous)
        self.ledger = open_ledger(home, config)  # SQLite, or PostgreSQL ([store] backend)
        # A remote ledger is asked from these threads, never from the loop (`ask_ledger`).
        self.ledger_threads = LedgerThreads()
        # Model calls' settlements, booked a moment after their answers, while a later call waits for
        # its backend (budget/deferred.py). A remote ledger's are booked from a worker thread, which
        # costs the loop next to nothing: they start at the next turn, as soon as they can.
        self.settlements = DeferredSettlements(self.ledger, self.publish_alerts, in_thread=self.ledger_threads.call,
                                               delay=0.0 if self.ledger.remote else BOOKKEEPING_DELAY)
        self.prices = PriceTable({m: Price(p.input_per_mtok, p.output_per_mtok) for m, p in config.prices.items()})
        self._waiters: dict[str, asyncio.Event] = {}
        # The next model call's reservation, made ahead for an agent that calls often (budget/spares.py);
        # the local ledger only.
        self.spares = Spares(self.ledger) if not self.ledger.remote else None
        # A sub-agent's spending also comes out of its parent's budgets; the Node says who the parent is.
        self.parent_of: Callable[[AgentRecord], AgentRecord | None] = lambda agent: None

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Close the stores. Ledger calls still running on threads (a reservation waiting on another
        daemon's row lock, a cancelled caller's release) are waited for, up to `wait` seconds,
        before the ledger's connections are closed under them. That wait blocks the caller: on
        the event loop, close `ledger_threads` from a thread first, as `Node.close` does."""
        self.settlements.flush(publish=False)  # Node.close drained them; the log may be closed by now
        if self.spares is not None:
            self.spares.release_all()
        self.ledger_threads.close(wait)
        self.versions.close()
        self.approvals.close()
        self.ledger.close()

    # -- decisions -------------------------------------------------------------------------

    @staticmethod
    def subject(agent: AgentRecord) -> Subject:
        return Subject(agent.id, agent.name, agent.role, agent.charter.get("max_tier") or "T0")

    def evaluate(self, agent: AgentRecord, action: str, attrs: dict[str, Any] | None = None,
                 *, explain: bool = False) -> Decision:
        """What the agent's bound policy (the exact text its charter names) says about `action`."""
        if agent.id == OPERATOR_ID:
            return OPERATOR_DECISION
        try:
            validate_pattern(action)
        except SubjectError as exc:
            return Decision(DENY, None, None, f"malformed action name: {exc}")
        if "*" in action or ">" in action:
            return Decision(DENY, None, None, "an action is a concrete name, not a pattern")
        policy = self.bound_policy(agent)
        if policy is None:
            return self._unbound(agent)
        return policy.engine.decide(self.subject(agent), action, attrs or {}, explain=explain)

    def bound_policy(self, agent: AgentRecord) -> Policy | None:
        binding = agent.charter.get("policy") or {}
        return self.by_hash.get(binding.get("hash", ""))

    @staticmethod
    def _unbound(agent: AgentRecord) -> Decision:
        binding = agent.charter.get("policy") or {}
        return Decision(DENY, None, None, f"the policy this agent is bound to ({binding.get('id')} "
                        f"sha256:{str(binding.get('hash'))[:12]}) is not known here; renew the charter",
                        ("binding: unknown policy hash",))

    def decide(self, agent: AgentRecord, env: Envelope) -> Decision:
        """The gate's policy step (PolicyHook): publishing is the action `bus.publish`."""
        if agent.id == OPERATOR_ID:
            return OPERATOR_DECISION
        policy = self.bound_policy(agent)
        if policy is None:
            return self._unbound(agent)
        d = policy.engine.decide(self.subject(agent), "bus.publish", {"subject": env.subject, "kind": env.kind})
        if d.effect == APPROVE:
            return Decision(DENY, d.rule, d.tier, f"{d.reason}; publishing cannot wait for an approval, use act()")
        return d

    async def publish_decision(self, agent: AgentRecord, action: str, d: Decision, **extra: Any) -> None:
        """One event per decision on `charter.decisions.NAME` (what the T3 audit in reflect reads)."""
        await self.emit(f"charter.decisions.{agent.name}", {
            "agent_id": agent.id, "action": action, "effect": d.effect, "rule": d.rule, "tier": d.tier,
            "reason": d.reason, **extra})

    async def act(self, agent: AgentRecord, action: str, attrs: dict[str, Any],
                  *, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """Decide an action; a T3 or approve-rule action opens (or reuses a window of) an approval."""
        if not isinstance(attrs, dict):
            raise CharterError(BAD_REQUEST, "attrs must be a JSON object", "attrs")
        d = self.evaluate(agent, action, attrs)
        extra: dict[str, Any] = {"request": request} if request else {}
        if d.effect != APPROVE:
            await self.publish_decision(agent, action, d, **extra)
            return {"decision": d.to_dict(), "effect": d.effect}
        window = self.approvals.window_for(agent.id, action)
        if window is not None:
            allowed = Decision(ALLOW, d.rule, d.tier, f"inside approval window {window.id}", d.path)
            await self.publish_decision(agent, action, allowed, approval_id=window.id, **extra)
            await self.emit(f"charter.approvals.{agent.name}", {"approval_id": window.id, "state": "used",
                                                                 "agent_id": agent.id, "action": action, "window": True})
            return {"decision": allowed.to_dict(), "effect": ALLOW, "approval_id": window.id}
        approval = self.approvals.request(
            agent_id=agent.id, agent_name=agent.name, action=action, attrs=attrs, rule=d.rule, tier=d.tier,
            reason=d.reason, ttl_s=self.config.policy.approval_ttl)
        await self.publish_decision(agent, action, d, approval_id=approval.id, **extra)
        await self.emit(f"charter.approvals.{agent.name}", {**_approval_event(approval)})
        return {"decision": d.to_dict(), "effect": APPROVE, "approval_id": approval.id,
                "expires_at": approval.expires_at}

    # -- approvals -------------------------------------------------------------------------

    def _wake(self, approval_id: str) -> None:
        ev = self._waiters.pop(approval_id, None)
        if ev:
            ev.set()

    async def decide_approval(self, doc: Any) -> Approval:
        """Apply an operator-signed decision; the signature is checked against the root key here."""
        doc = verify_decision(self.root_public, doc)
        approval = self.approvals.decide(doc)
        await self.emit(f"charter.approvals.{approval.agent_name}", {**_approval_event(approval), "decision": doc})
        self._wake(approval.id)
        return approval

    async def expire_due(self) -> list[Approval]:
        expired = self.approvals.expire_due()
        for a in expired:
            await self.emit(f"charter.approvals.{a.agent_name}", _approval_event(a))
            self._wake(a.id)
        return expired

    async def wait_approval(self, agent: AgentRecord, approval_id: str, timeout: float) -> dict[str, Any]:
        """Wait up to `timeout` for the operator. Approved: claim it (exactly once) and allow."""
        deadline = time.monotonic() + max(0.0, min(timeout, 300.0))
        while True:
            await self.expire_due()
            a = self.approvals.get(approval_id)
            if a.agent_id != agent.id:
                raise CharterError(NOT_FOUND, f"no approval {approval_id!r} for this agent", "approval")
            if a.state != "pending":
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return {"effect": APPROVE, "state": "pending", "approval_id": a.id, "expires_at": a.expires_at}
            ev = self._waiters.setdefault(approval_id, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), min(left, max((a.expires_at - _now()) / 1000, 0.01)))
            except TimeoutError:
                pass
        if a.state == APPROVED:
            claimed = self.approvals.claim(a.id, agent.id)
            await self.emit(f"charter.approvals.{agent.name}", {**_approval_event(claimed), "state": "used"})
            return {"effect": ALLOW, "state": claimed.state, "approval_id": a.id, "window_until": a.window_until}
        reason = {"denied": "the operator denied it", "expired": "nobody approved it in time; expired into a denial",
                  "used": "this approval was already used"}.get(a.state, a.state)
        return {"effect": DENY, "state": a.state, "approval_id": a.id, "reason": reason}

    # -- budgets ---------------------------------------------------------------------------

    def default_limits(self, agent: AgentRecord) -> list[Limit]:
        b = agent.charter.get("budget") or {}
        soft = self.config.budget.soft_ratio
        out = []
        if b.get("usd_per_day") is not None:
            out.append(Limit(f"agent:{agent.id}", "usd", "day", int(round(b["usd_per_day"] * MICRO)), soft))
        if b.get("tokens_per_day") is not None:
            out.append(Limit(f"agent:{agent.id}", "tokens", "day", int(b["tokens_per_day"]), soft))
        return out

    def limits_for(self, agent: AgentRecord) -> list[Limit]:
        limits = self.ledger.applicable(agent.id, agent.role, self.default_limits(agent))
        parent = self.parent_of(agent)
        if parent is not None:  # delegation only narrows: a sub-agent cannot spend what its parent may not
            seen = {(lim.scope, lim.unit, lim.period) for lim in limits}
            limits += [lim for lim in self.limits_for(parent) if (lim.scope, lim.unit, lim.period) not in seen]
        return limits

    def free_models(self, agent: AgentRecord) -> list[str]:
        """Models that cost nothing and that this agent's policy lets it call: where to degrade to.

        Candidates are the gateway's own models (every `backend/model` in an alias chain) plus the
        zero-priced entries of the price table; a local (`ollama`) backend is free unless priced.
        """
        kinds = {name: b.kind for name, b in self.config.models.backends.items()}
        candidates: dict[str, None] = {}
        for chain in self.config.models.aliases.values():
            for ref in chain:
                if "/" in ref:
                    candidates[ref] = None
        for model in self.prices.free_models():
            candidates.setdefault(model, None)
        out = []
        for ref in candidates:
            backend, _, name = ref.partition("/")
            kind = kinds.get(backend, backend)
            try:
                free = self.prices.price(ref).cost_micros(1000, 1000) == 0
            except KeyError:
                free = kind == "ollama"
            if free and self.evaluate(agent, "model.call", {"provider": kind, "backend": backend, "model": name,
                                                            "paid": False, "amount_usd": 0.0}).allowed:
                out.append(ref)
        return out

    def admit_spend(self, agent: AgentRecord, action: str, attrs: dict[str, Any], *, usd: int, tokens: int,
                    model: str, ttl_s: float, approval_id: str | None = None, limits: list[Limit] | None = None,
                    reserve: bool | None = True, on_expiry: str = "release", spare: bool = False) -> Spend:
        """Policy, approval, tier cap and budget for one spend, in that order, publishing nothing.

        The one path every spend takes (the reserve API and the gateway's model calls), so a tier cap
        or an amount rule cannot be skipped by calling the ledger directly. An `approve` decision goes
        through only with an approval: `approval_id`, or a window covering this agent and action; a
        one-shot approval is spent on this reservation exactly once. With `reserve=False`, or no limit
        to reserve against when `reserve` is None, nothing is reserved. `on_expiry` is the ledger's
        (`Ledger.reserve`). `spare`: the reservation may be a spare made ahead, and one is made for
        the next call like it (charter.budget.spares; the gateway's calls). Raises SpendRefused. On
        the event loop, use `admit_spend_async`.
        """
        d, approval = self._spend_decision(agent, action, attrs, usd, approval_id)
        if reserve is False:
            return Spend(d, None, usd, approval)
        res = self._spend_reserve(agent, action, d, usd, tokens, model, ttl_s, limits, reserve, on_expiry, spare)
        return self._spend_bound(d, res, usd, approval)

    async def admit_spend_async(self, agent: AgentRecord, action: str, attrs: dict[str, Any], *, usd: int,
                                tokens: int, model: str, ttl_s: float, approval_id: str | None = None,
                                limits: list[Limit] | None = None, reserve: bool | None = True,
                                on_expiry: str = "release", spare: bool = False) -> Spend:
        """`admit_spend` for a caller on the event loop. A ledger across the network (PostgreSQL) is
        asked from a worker thread: its round trips, and the row locks another daemon's reservations
        hold, would otherwise stall every request this daemon serves meanwhile. The local SQLite
        ledger is asked inline, where a thread hop would cost more than the reservation."""
        if not self.ledger.remote:
            return self.admit_spend(agent, action, attrs, usd=usd, tokens=tokens, model=model, ttl_s=ttl_s,
                                    approval_id=approval_id, limits=limits, reserve=reserve, on_expiry=on_expiry,
                                    spare=spare)
        d, approval = self._spend_decision(agent, action, attrs, usd, approval_id)
        if reserve is False:
            return Spend(d, None, usd, approval)
        args = (agent, action, d, usd, tokens, model, ttl_s, limits, reserve, on_expiry)
        try:
            res = await self._spend_reserve_remote(*args)
        except SpendRefused as exc:
            # Refused while answers delivered already still hold their full reservations (their
            # settlements queued, or being booked from a worker thread): asked again once those
            # are booked, as on the local ledger (`_reserve`). Never for settlements queued later.
            if exc.code != BUDGET_EXCEEDED or not self.settlements.owed:
                raise
            await self.settlements.caught_up()
            res = await self._spend_reserve_remote(*args)
        given_back: list[str] = []
        try:
            return self._spend_bound(d, res, usd, approval, release=given_back.append)
        except BaseException:  # e.g. the approval was spent meanwhile: refused once the money is back
            for rid in given_back:
                await self.give_back(rid)
            raise

    async def _spend_reserve_remote(self, *args: Any) -> Reservation | None:
        """`_spend_reserve` on a ledger thread; a caller cancelled meanwhile leaves nothing held."""
        handoff = ReservationHandoff(self.ledger.release, self.release_later)
        try:
            return await self.ledger_threads.call(handoff.run, self._spend_reserve, *args)
        except BaseException:  # cancelled, or the loop is going: whatever the thread reserves goes back
            handoff.abandon()
            raise

    async def release_async(self, reservation_id: str, agent_id: str | None = None) -> None:
        """`ledger.release` for a caller on the event loop (see `admit_spend_async`)."""
        await self.ask_ledger(self.ledger.release, reservation_id, agent_id=agent_id)

    async def give_back(self, reservation_id: str, agent_id: str | None = None) -> None:
        """Release a reservation for a caller that may be cancelled meanwhile (a client hanging up):
        on a remote ledger the release goes on regardless, and a failure is logged, not raised."""
        release = functools.partial(self.ledger.release, agent_id=agent_id)
        if not self.ledger.remote:
            release_quietly(release, reservation_id)
            return
        try:
            await asyncio.shield(self.ledger_threads.call(release_quietly, release, reservation_id))
        except CharterError:  # the ledger is closing: its thread, if any is left, or the expiry
            self.release_later(reservation_id)

    def release_later(self, reservation_id: str) -> None:
        """Have a ledger thread give a reservation back, for a caller who cannot wait (it left)."""
        try:
            self.ledger_threads.submit(release_quietly, self.ledger.release, reservation_id)
        except CharterError as exc:  # closed: the daemon is stopping; the expiry books or releases it
            warn_unreleased(reservation_id, exc)

    def _spend_decision(self, agent: AgentRecord, action: str, attrs: dict[str, Any], usd: int,
                        approval_id: str | None) -> tuple[Decision, Approval | None]:
        """Policy, approval and the tier's cap: the decision, and the approval that lets it through."""
        d = self.evaluate(agent, action, attrs)
        if d.effect == DENY:
            raise SpendRefused(POLICY_DENIED, d.reason, "action", d, {"decision": d.to_dict()})
        approval = None
        if d.effect == APPROVE:
            try:
                approval = self.approvals.for_spend(approval_id, agent_id=agent.id, action=action, usd_micros=usd)
            except CharterError as exc:
                raise SpendRefused(exc.code, exc.message, exc.where, d, {"decision": d.to_dict()}) from None
            if approval is None:
                raise SpendRefused(APPROVAL_REQUIRED, f"{d.reason}; ask with act() first and pass its approval_id",
                                   "action", d, {"decision": d.to_dict()})
            d = Decision(ALLOW, d.rule, d.tier, f"{d.reason}; approved ({approval.id})", d.path)
        cap = self.config.budget.tier_caps.get(d.tier or "T0")  # type: ignore[call-overload]
        if cap is not None and usd > cap * MICRO:
            raise SpendRefused(BUDGET_EXCEEDED, f"one {d.tier} action may reserve at most ${cap:g}; asked ${usd / MICRO:g}",
                               f"tier_cap:{d.tier}", d, {"asked": usd, "cap": int(cap * MICRO), "tier": d.tier})
        return d, approval

    def _spend_reserve(self, agent: AgentRecord, action: str, d: Decision, usd: int, tokens: int, model: str,
                       ttl_s: float, limits: list[Limit] | None, reserve: bool | None,
                       on_expiry: str, spare: bool = False) -> Reservation | None:
        """The ledger's part (on a worker thread for a remote ledger): None when nothing is to be reserved."""
        limits = self.limits_for(agent) if limits is None else limits
        if reserve is None and not limits:
            return None
        terms = {"agent_id": agent.id, "role": agent.role, "usd": usd, "tokens": tokens, "limits": limits,
                 "model": model, "action": action, "ttl_s": ttl_s, "on_expiry": on_expiry}
        spares = self.spares if spare else None
        key: Hashable = None
        res = None
        if spares is not None:
            key = Spares.key(agent.id, agent.role, model, action, on_expiry, ttl_s, limits)
            res = spares.take(key, usd, tokens)
        if res is None:
            try:
                res = self._reserve(terms)
            except CharterError as exc:
                if exc.code != BUDGET_EXCEEDED:
                    raise
                msg = exc.message.replace(f"agent:{agent.id} ", f"{agent.name}'s ")
                raise SpendRefused(exc.code, msg, exc.where, d, exc.details) from None
        if spares is not None:
            spares.want(key, terms)
        return res

    def _reserve(self, terms: dict[str, Any]) -> Reservation:
        """`ledger.reserve`, asked again once if refused while money was held for nothing: the
        settlements of answers delivered already, still queued (budget/deferred.py), or spares
        made for calls not yet made (budget/spares.py). Neither may refuse a call being made."""
        try:
            return self.ledger.reserve(**terms)
        except CharterError as exc:
            if exc.code != BUDGET_EXCEEDED or self.ledger.remote:
                raise
            queued, spares = len(self.settlements), self.spares.held() if self.spares is not None else 0
            if not queued and not spares:
                raise
        self.settlements.flush()
        if self.spares is not None:
            self.spares.release_all()
        return self.ledger.reserve(**terms)

    def _spend_bound(self, d: Decision, res: Reservation | None, usd: int, approval: Approval | None,
                     release: Callable[[str], None] | None = None) -> Spend:
        """A one-shot approval is spent on this reservation, exactly once. `release` gives the
        reservation back when it cannot be (the ledger's own, inline, unless given)."""
        if res is not None and approval is not None and approval.window_until is None:
            try:
                approval = self.approvals.bind_reservation(approval.id, res.id)
            except CharterError as exc:  # spent meanwhile by a concurrent reservation: give this one back
                (release or self.ledger.release)(res.id)
                raise SpendRefused(exc.code, exc.message, exc.where, d, {"decision": d.to_dict()}) from None
            except BaseException:  # the approvals' store failed: nothing holds the reservation for anyone
                (release or self.ledger.release)(res.id)
                raise
        return Spend(d, res, usd, approval)

    async def reserve(self, agent: AgentRecord, req: dict[str, Any]) -> dict[str, Any]:
        """Reserve for one action: sized from the model's price and the request's maximum tokens.

        One decision event per call, whatever the outcome (a budget refusal also has its budget event).
        """
        action = req.get("action", "model.call")
        model = req.get("model") or ""
        approval_id = req.get("approval_id")
        if not isinstance(action, str) or not isinstance(model, str):
            raise CharterError(BAD_REQUEST, "action and model are strings", "action")
        if approval_id is not None and not isinstance(approval_id, str):
            raise CharterError(BAD_REQUEST, "approval_id is a string (the id act() returned)", "approval_id")
        try:
            tokens_in = int(req.get("input_tokens", 0))
            max_out = int(req.get("max_output_tokens", 0))
        except (TypeError, ValueError):
            raise CharterError(BAD_REQUEST, "input_tokens and max_output_tokens are integers", "tokens") from None
        if tokens_in < 0 or max_out < 0:
            raise CharterError(BAD_REQUEST, "token counts cannot be negative", "tokens")
        if "usd" in req:
            try:
                usd = int(round(float(req["usd"]) * MICRO))
            except (TypeError, ValueError, OverflowError):
                raise CharterError(BAD_REQUEST, "usd is a finite number of dollars", "usd") from None
            if usd < 0:
                raise CharterError(BAD_REQUEST, f"usd cannot be negative, got {req['usd']}", "usd")
        elif model:
            try:
                usd = self.prices.price(model).cost_micros(tokens_in, max_out)
            except KeyError as exc:
                raise CharterError(BAD_REQUEST, str(exc.args[0]), "model") from None
        else:
            usd = 0
        provider, _, name = model.partition("/")
        paid = usd > 0
        if model and not paid:  # as the gateway says it: a model with a price is paid (unknown: paid)
            try:
                paid = self.prices.price(model) != FREE
            except KeyError:
                paid = True
        attrs = {"provider": provider, "model": name, "paid": paid, "amount_usd": usd / MICRO,
                 "tokens": tokens_in + max_out}
        try:
            spend = await self.admit_spend_async(agent, action, attrs, usd=usd, tokens=tokens_in + max_out,
                                                 model=model, ttl_s=self._ttl(req.get("ttl_s")),
                                                 approval_id=approval_id)
        except SpendRefused as err:
            d = err.decision
            if err.code == BUDGET_EXCEEDED:
                err.details = {**(err.details or {}), "free_models": self.free_models(agent)}
                await self.publish_decision(agent, action, Decision(DENY, d.rule, d.tier, err.message, d.path),
                                           code=err.code, usd_micros=usd)
                await self._refused(agent, err)
            else:
                await self.publish_decision(agent, action, d, code=err.code, usd_micros=usd,
                                           **({"approval_id": approval_id} if approval_id else {}))
            raise
        res, d = spend.reservation, spend.decision
        if res is None:  # cannot happen: reserve=True always reserves; refuse rather than hand out nothing
            raise CharterError("internal", "no reservation was taken", "budget")
        used = spend.approval.id if spend.approval else None
        await self.publish_decision(agent, action, d, reservation_id=res.id, usd_micros=usd,
                                   **({"approval_id": used} if used else {}))
        if spend.approval is not None and spend.approval.window_until is None:
            await self.emit(f"charter.approvals.{agent.name}", {**_approval_event(spend.approval), "state": "used",
                                                                 "reservation_id": res.id})
        await self.publish_alerts(agent, res.alerts)
        out = {**res.to_dict(), "usd": usd / MICRO, "tier": d.tier, "rule": d.rule}
        if used:
            out["approval_id"] = used
        return out

    def _ttl(self, value: Any) -> float:
        """A reservation lives at most `budget.reservation_ttl`: an agent cannot park shared money."""
        cap = self.config.budget.reservation_ttl
        if value is None:
            return cap
        try:
            ttl = float(value)
        except (TypeError, ValueError):
            raise CharterError(BAD_REQUEST, "ttl_s is a number of seconds", "ttl_s") from None
        if not 0 < ttl < float("inf"):
            raise CharterError(BAD_REQUEST, "ttl_s must be a positive, finite number of seconds", "ttl_s")
        return min(ttl, cap)

    async def publish_alerts(self, agent: AgentRecord, alerts: Iterable[dict[str, Any]]) -> None:
        """Budget alerts (a soft threshold reached, an overrun booked) on `charter.budget.alerts`."""
        for alert in alerts:
            await self.emit("charter.budget.alerts", {"agent_id": agent.id, "name": agent.name, **alert})

    async def _refused(self, agent: AgentRecord, err: CharterError) -> None:
        await self.emit(f"charter.budget.{agent.name}", {"agent_id": agent.id, "event": "refused",
                                                         "reason": err.message, **(err.details or {})})

    async def settle(self, agent: AgentRecord, req: dict[str, Any]) -> dict[str, Any]:
        rid = req.get("reservation_id")
        if not isinstance(rid, str):
            raise CharterError(BAD_REQUEST, "reservation_id is required", "reservation_id")
        try:
            tokens_in = int(req.get("tokens_in", 0))
            tokens_out = int(req.get("tokens_out", 0))
        except (TypeError, ValueError):
            raise CharterError(BAD_REQUEST, "tokens_in and tokens_out are integers", "tokens") from None
        if "usd" in req:
            try:
                usd = int(round(float(req["usd"]) * MICRO))
            except (TypeError, ValueError, OverflowError):
                raise CharterError(BAD_REQUEST, "usd is a finite number of dollars", "usd") from None
        else:
            model = await self.ask_ledger(self.ledger.reservation_model, rid)
            usd = self.prices.price(model).cost_micros(tokens_in, tokens_out) if model else 0
        s = await self.ask_ledger(self.ledger.settle, rid, usd=usd, tokens_in=tokens_in, tokens_out=tokens_out,
                            agent_id=agent.id)
        await self.emit(f"charter.budget.{agent.name}", {"agent_id": agent.id, "event": "settled",
                                                         "reservation_id": rid, "usd_micros": usd,
                                                         "tokens_in": tokens_in, "tokens_out": tokens_out,
                                                         "overrun": s.overrun, "late": s.late})
        await self.publish_alerts(agent, s.alerts)
        return {"reservation_id": rid, "usd": usd / MICRO, "tokens": s.tokens, "overrun": s.overrun, "late": s.late}

    async def release(self, agent: AgentRecord, rid: Any) -> dict[str, Any]:
        if not isinstance(rid, str):
            raise CharterError(BAD_REQUEST, "reservation_id is required", "reservation_id")
        await self.release_async(rid, agent.id)
        return {"reservation_id": rid, "released": True}

    async def ask_ledger(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A ledger call from the event loop: off it for a remote ledger (see `admit_spend_async`)."""
        if self.ledger.remote:
            return await self.ledger_threads.call(fn, *args, **kw)
        return fn(*args, **kw)

    async def budget_view(self, agent: AgentRecord) -> dict[str, Any]:
        """One agent's limits, with what is used and left, and where it may go when they are spent
        (the settlements of answers delivered already booked first, spares given back)."""
        await self.settled()
        usage = await self.ask_ledger(lambda: self.ledger.usage(self.limits_for(agent)))
        return {"agent_id": agent.id, "limits": usage, "free_models": self.free_models(agent)}

    def budget_rows(self, agents: Iterable[AgentRecord]) -> list[dict[str, Any]]:
        """Every limit in force with its use in the current period: those set, and each live agent's
        charter defaults that no set limit overrides. On the event loop, use `budget_overview`."""
        limits = self.ledger.limits()
        for a in agents:
            if a.status != "revoked":
                explicit = {(lim.unit, lim.period) for lim in limits if lim.scope == f"agent:{a.id}"}
                limits += [d for d in self.default_limits(a) if (d.unit, d.period) not in explicit]
        return self.ledger.usage(limits)

    async def budget_overview(self, agents: Iterable[AgentRecord]) -> list[dict[str, Any]]:
        """`budget_rows`, the settlements of answers delivered already booked first, spares given back."""
        await self.settled()
        return await self.ask_ledger(self.budget_rows, list(agents))

    async def spend_history(self, **kw: Any) -> list[dict[str, Any]]:
        """`ledger.history`, the settlements of answers delivered already booked first."""
        await self.settlements.caught_up()
        return await self.ask_ledger(self.ledger.history, **kw)

    async def settled(self) -> None:
        """Before a budget is read: book what answers left queued, and give the spares back, so that
        what is reserved is what calls in flight hold (charter.budget.spares)."""
        await self.settlements.caught_up()
        if self.spares is not None:
            self.spares.release_all()


def _approval_event(a: Approval) -> dict[str, Any]:
    return {"approval_id": a.id, "state": a.state, "agent_id": a.agent_id, "action": a.action, "rule": a.rule,
            "tier": a.tier, "reason": a.reason, "expires_at": a.expires_at, "window_until": a.window_until}


def tier_index(tier: str) -> int:
    return TIERS.index(tier)

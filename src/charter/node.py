"""The Node: one Charter installation opened for work. The daemon serves it; tests embed it.

It owns the root key, the registry, the log and the gate, and it is the only place where an
operator action becomes both a state change and an event on the bus, attributed to the operator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ulid import ULID

from charter import __version__
from charter.bus import envelope as envmod
from charter.bus.deferred import DeferredEvents
from charter.bus.envelope import Envelope
from charter.bus.gate import Gate
from charter.bus.log.base import ConsumerState, DuplicateIds, LogEntry, Receipt
from charter.bus.log.backends import open_log
from charter.bus.replay import ReplayGuard
from charter.bus.subjects import SubjectError, matches, validate_pattern
from charter.config import Config, Home
from charter.encoding import loads
from charter.errors import (
    BAD_REQUEST,
    BAD_SIGNATURE,
    BAD_TOKEN,
    CONFLICT,
    EXPIRED,
    MALFORMED,
    OUT_OF_SCOPE,
    POLICY_DENIED,
    REPLAY,
    REVOKED,
    SUSPENDED,
    CharterError,
    Rejection,
)
from charter.identity.certificate import sign_charter
from charter.identity.keys import PublicKey, SigningKey
from charter.identity.registry import (
    ACTIVE,
    OPERATOR_ID,
    AgentRecord,
    Invite,
    now_ms,
)
from charter.identity.registry import REVOKED as ST_REVOKED
from charter.identity.registry import SUSPENDED as ST_SUSPENDED
from charter.identity.store import open_registry
from charter.identity.tokens import looks_like_token, new_api_key, new_token, token_hash
from charter.governance import CLOSE_WAIT, Governance
from charter.identity.proofs import enroll_proof_message, rotate_proof_message, subagent_proof_message
from charter.observability.context import request_id
from charter.sandbox import Sandbox

log = logging.getLogger("charter.node")
AGENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
FAR_FUTURE = 2**62


@dataclass(frozen=True, slots=True)
class Outcome:
    """One envelope's fate in a batch: a receipt, or the rejection that refused it."""

    receipt: Receipt | None = None
    error: CharterError | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.receipt.to_dict() if self.receipt else {"error": self.error.to_dict()}  # type: ignore[union-attr]


class Node:
    def __init__(self, home: Home, config: Config | None = None) -> None:
        self.home = home
        self.config = config or home.load_config()
        if not home.root_key_path.exists():
            raise CharterError("not_initialised", f"{home.root} has no root key; run `charter init`", str(home.root))
        self.root_key = SigningKey.load_pem(home.root_key_path)
        self.registry = open_registry(home, self.config)  # charter.db, or PostgreSQL shared by daemons
        self.log = open_log(self.config.bus, home.db_path)  # SqliteLog, or NatsLog (docs/nats.md)
        window = int(self.config.bus.replay_window * 1000)
        self.replay = ReplayGuard(window)
        self.request_guard = ReplayGuard(window)
        self.operator = AgentRecord(
            id=OPERATOR_ID, name=OPERATOR_ID, role="operator", public_key=self.root_key.public,
            status=ACTIVE, reason="", issued_at=0, expires_at=FAR_FUTURE,
            charter={"scopes": {"publish": [">"], "subscribe": [">"], "read": [">"]}},
        )
        self.gov = Governance(home, self.config, self.emit, self.root_key.public)
        self.gov.parent_of = lambda a: self.registry.get((a.charter.get("parent") or {}).get("agent_id", ""))
        self.gate = Gate(self.lookup, self.replay, self.gov)
        from charter.models.gateway import Gateway

        self.gateway = Gateway(self)
        from charter.observability.metrics import Metrics

        self.metric_sources: list[Callable[[], Iterator[Any]]] = []  # other parts add collectors here
        self.state_providers: dict[str, Callable[[], Any]] = {}  # other parts add their live state here
        from charter.capsules.build import CapsuleBuilder
        from charter.reflect.engine import Reflector

        self.reflector = Reflector(home.db_path, self.config.truths)
        self.capsules = CapsuleBuilder(self)
        from charter.archive.archivist import Archivist

        self.archivist = Archivist.for_node(self)  # seals, checkpoints, mirrors (docs/archive.md)
        from charter.supervisor import Supervisor

        self.supervisor = Supervisor.for_node(self)  # services checked, restarted, reported (docs/supervisor.md)
        from charter.bus.nats_bridge import NatsBridge

        self.nats = NatsBridge.for_node(self)  # agents on NATS with user JWTs, when enabled (docs/nats.md)
        self.metrics = Metrics(self)
        self.dashboard_token_hash: str | None = None
        self.started_at = now_ms()
        self.counters: dict[str, int] = {"accepted": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.deferred = DeferredEvents(self._seal_event, self._write_sealed)  # see emit_soon

    async def start(self) -> None:
        """Rebuild the replay guard from the log, then announce the start on the bus."""
        since = now_ms() - self.replay.window_ms
        for sender, nonce, ts in await self.log.recent_nonces(since):
            self.replay.remember(sender, nonce, ts)
        self.new_dashboard_token()
        await self.emit("charter.daemon.started", {"version": __version__, "pid": os.getpid()})
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        self.gateway.start()
        self.capsules.start()
        self.archivist.start()
        await self.supervisor.start()
        await self.nats.start()

    async def _sweep_forever(self, every: float = 1.0) -> None:
        """Expire undecided approvals into denials and return leaked budget reservations."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.gov.expire_due()
                if self.gov.spares is not None:
                    self.gov.spares.expire()  # spares nobody took give their money back
                await self.gov.ask_ledger(self.gov.ledger.sweep)
            except Exception:  # noqa: BLE001 - keep sweeping; the next pass retries
                log.exception("sweep failed")

    def backend_call_ahead(self) -> None:
        """A model call is about to go to its backend: the loop will have a round trip to spare.

        What earlier answers left to do (their settlements, their call events) is done then, just
        after the request is sent: two hops of the loop put it behind the HTTP client's task that
        writes the request (aiohttp, before Python 3.12). See charter.bus.deferred."""
        spares = self.gov.spares
        if self.deferred or self.gov.settlements or (spares is not None and spares.wanted):
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._bookkeeping)

    def _bookkeeping(self) -> None:
        steps = [self.gov.settlements.kick, self.deferred.kick]
        if self.gov.spares is not None:  # the next call's reservation, made ahead (charter.budget.spares)
            steps.insert(1, self.gov.spares.refill)
        for step in steps:  # each on its own: one that fails leaves the others done
            try:
                step()
            except Exception:  # noqa: BLE001 - each logs what it could not do; this is the backstop
                log.exception("the gateway's bookkeeping failed")

    async def close(self) -> None:
        if self.gov.spares is not None:
            self.gov.spares.release_all()
        await self.gov.settlements.drain()  # queued settlements (their alerts are events)
        await self.deferred.drain()  # queued events first, while everything they need is open
        if self._sweeper:
            self._sweeper.cancel()
        for t in list(self._tasks):
            t.cancel()
        await self.supervisor.close()
        await self.nats.close()
        await self.gateway.close()
        await self.capsules.close()
        await self.archivist.close()
        self.reflector.close()
        # Ledger calls still on threads (a reservation waiting on another daemon's row lock, a
        # cancelled caller's release) finish first, waited for off the loop; then what they and
        # closing the parts queued (a stream broken by the gateway's close settles what it sent)
        # is booked and written while the log is still open.
        await asyncio.to_thread(self.gov.ledger_threads.wait_idle, CLOSE_WAIT)
        await self.gov.settlements.drain()
        await self.deferred.drain()
        await asyncio.to_thread(self.gov.ledger_threads.close, 1.0)
        await self.log.close()
        # Off the loop: on PostgreSQL, closing waits for the listener and for a miss's read under way.
        await asyncio.to_thread(self.registry.close)
        self.gov.close()

    @property
    def policies(self) -> dict[str, Any]:
        return self.gov.current

    def lookup(self, sender: str) -> AgentRecord | None:
        if sender == OPERATOR_ID:
            return self.operator
        return self.registry.get(sender)

    # -- the bus ---------------------------------------------------------------------------

    def _count(self, code: str) -> None:
        self.counters[code] = self.counters.get(code, 0) + 1

    async def publish(self, data: bytes | Envelope) -> Receipt:
        """Verify and append one envelope; the receipt means it is durable."""
        return await self._publish(data)

    async def _publish(self, data: bytes | Envelope, *, signed_here: bool = False) -> Receipt:
        try:
            env = data if isinstance(data, Envelope) else envmod.parse(data, max_bytes=self.config.bus.max_envelope_bytes)
            self.gate.check(env, signed_here=signed_here)
        except Rejection as exc:
            self._count(exc.code)
            raise
        try:
            (receipt,) = await self.log.append((env,))
        except DuplicateIds:
            self._count(REPLAY)
            raise Rejection(REPLAY, f"an envelope with id {env.id} is already in the log", "id") from None
        except BaseException:
            self.replay.release(env.sender, env.nonce)
            raise
        self.counters["accepted"] += 1
        if env.kind == "action":
            self._after_action(env, receipt)
        return receipt

    def _after_action(self, env: Envelope, receipt: Receipt) -> None:
        """An action request on the bus gets a decision event, as if asked through act()."""
        agent = self.lookup(env.sender)
        payload = env.payload if isinstance(env.payload, dict) else {}
        action, attrs = payload.get("action"), payload.get("attrs", {})
        if agent is None or agent.id == OPERATOR_ID or not isinstance(action, str) or not isinstance(attrs, dict):
            return
        task = asyncio.get_running_loop().create_task(
            self.gov.act(agent, action, attrs, request={"id": env.id, "seq": receipt.seq}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish_batch(self, items: Sequence[Any]) -> list[Outcome]:
        """Verify each envelope (bytes or decoded dicts); append all accepted ones in one transaction."""
        if len(items) > self.config.bus.max_batch:
            raise CharterError(BAD_REQUEST, f"a batch holds at most {self.config.bus.max_batch} envelopes", "batch")
        return await self._append_batch(items)

    async def _append_batch(self, items: Sequence[Any], *, signed_here: bool = False) -> list[Outcome]:
        """Gate every item, then append the accepted ones in one transaction. `signed_here`: see Gate.check."""
        max_bytes = self.config.bus.max_envelope_bytes
        outcomes: list[Outcome | None] = [None] * len(items)
        accepted: list[tuple[int, Envelope]] = []
        now = now_ms()
        for i, item in enumerate(items):
            try:
                if isinstance(item, Envelope):
                    env = item
                elif isinstance(item, (bytes, str)):
                    env = envmod.parse(item, max_bytes=max_bytes)
                else:
                    env = envmod.from_dict(item, max_bytes=max_bytes)
                self.gate.check(env, now, signed_here=signed_here)
                accepted.append((i, env))
            except Rejection as exc:
                self._count(exc.code)
                outcomes[i] = Outcome(error=exc)
        try:
            try:
                receipts = await self.log.append([e for _, e in accepted])
            except DuplicateIds as dup:
                for pos in sorted(dup.positions):
                    i, env = accepted[pos]
                    self._count(REPLAY)
                    outcomes[i] = Outcome(error=Rejection(REPLAY, f"an envelope with id {env.id} is already in the log", "id"))
                accepted = [a for pos, a in enumerate(accepted) if pos not in dup.positions]
                receipts = await self.log.append([e for _, e in accepted])
        except BaseException:
            for _, env in accepted:
                self.replay.release(env.sender, env.nonce)
            raise
        for (i, env), r in zip(accepted, receipts, strict=True):
            outcomes[i] = Outcome(receipt=r)
            if env.kind == "action":
                self._after_action(env, r)
        self.counters["accepted"] += len(receipts)
        return outcomes  # type: ignore[return-value]

    def _seal_event(self, subject: str, payload: Any) -> Envelope:
        return envmod.seal(self.root_key, sender=OPERATOR_ID, subject=subject, payload=payload, kind="event")

    async def _write_sealed(self, envelopes: Sequence[Envelope]) -> list[str | None]:
        outcomes = await self._append_batch(envelopes, signed_here=True)
        return [o.error.message if o.error else None for o in outcomes]

    def emit_soon(self, subject: str, payload: Any) -> None:
        """`emit`, for an event nobody waits for: queued, and written with every other event queued
        meanwhile, in one transaction, while a model call waits for its backend, or 5 ms later at
        the latest (see charter.bus.deferred).
        A failure to write it is logged, not raised."""
        rid = request_id.get()
        if rid is not None and isinstance(payload, dict) and "request_id" not in payload:
            payload = {**payload, "request_id": rid}
        self.deferred.add(subject, payload)

    async def emit(self, subject: str, payload: Any, kind: str = "event") -> Receipt:
        """Publish as the operator (signed with the root key): lifecycle and daemon events.

        An event caused by an HTTP request carries that request's id, as the access log does.
        """
        rid = request_id.get()
        if rid is not None and isinstance(payload, dict) and "request_id" not in payload:
            payload = {**payload, "request_id": rid}
        env = envmod.seal(self.root_key, sender=OPERATOR_ID, subject=subject, payload=payload, kind=kind)
        # Sealed a line above with the key the gate would check it against: verifying it again
        # would only spend ~80 us per event on every model call's decision and call events.
        return await self._publish(env, signed_here=True)

    def check_subscription(self, agent: AgentRecord, pattern: str) -> str:
        try:
            validate_pattern(pattern)
        except SubjectError as exc:
            raise Rejection(MALFORMED, str(exc), "pattern") from None
        if not agent.subscribe.covers(pattern):
            raise Rejection(OUT_OF_SCOPE, f"{agent.name} may not subscribe to {pattern!r}", "pattern")
        return pattern

    def ensure_live(self, agent_id: str) -> AgentRecord:
        """Re-read an agent's state: used by long streams so a revocation ends them."""
        agent = self.lookup(agent_id)
        if agent is None:
            raise CharterError(REVOKED, "agent no longer exists", "sender")
        if agent.status == ST_REVOKED:
            raise CharterError(REVOKED, f"agent {agent.name} was revoked", "sender")
        if agent.status == ST_SUSPENDED:
            raise CharterError(SUSPENDED, f"agent {agent.name} is suspended", "sender")
        if now_ms() >= agent.expires_at:
            raise CharterError(EXPIRED, f"agent {agent.name}'s charter expired", "sender")
        return agent

    async def open_consumer(self, agent: AgentRecord, name: str, pattern: str, from_seq: int | None) -> ConsumerState:
        if not AGENT_NAME.fullmatch(name):
            raise CharterError(BAD_REQUEST, "a consumer name is lowercase letters, digits and '-'", "consumer")
        state = await self.log.consumer(agent.id, name)
        if state is None:
            start = (from_seq - 1) if from_seq is not None else 0
            state = ConsumerState(agent.id, name, pattern, max(start, 0))
            await self.log.put_consumer(state)
        elif state.pattern != pattern:
            raise CharterError(
                CONFLICT, f"consumer {name!r} follows {state.pattern!r}, not {pattern!r}", "consumer"
            )
        return state

    async def stream(
        self, agent: AgentRecord, pattern: str, after_seq: int, *, heartbeat: float = 15.0
    ) -> AsyncIterator[LogEntry | None]:
        """Entries matching `pattern` after `after_seq`, then live ones. Yields None as a heartbeat.

        Ends with CharterError as soon as the subscriber is revoked, suspended or expired.
        """
        last = after_seq
        while True:
            self.ensure_live(agent.id)
            entries = await self.log.read(last, 500)
            if entries:
                for e in entries:
                    last = e.seq
                    if matches(pattern, e.subject):
                        yield e
                continue
            head = await self.log.wait(last, heartbeat)
            if head <= last:
                yield None

    async def read_recent(self, agent: AgentRecord, pattern: str, limit: int, before_seq: int | None = None) -> list[LogEntry]:
        """The last `limit` entries matching `pattern` (for `charter tail` and the agent's view),
        the events still queued (`emit_soon`) included."""
        self.check_subscription(agent, pattern)
        await self.deferred.caught_up()
        head = (await self.log.head())[0] if before_seq is None else before_seq - 1
        out: list[LogEntry] = []
        cursor = head
        while cursor > 0 and len(out) < limit:
            start = max(cursor - 2000, 0)
            chunk = [e for e in await self.log.read(start, cursor - start) if matches(pattern, e.subject)]
            out = chunk + out
            cursor = start
        return out[-limit:]

    # -- invites and enrolment -------------------------------------------------------------

    async def create_invite(self, role: str, ttl: float | None = None, uses: int = 1, note: str = "") -> tuple[str, Invite]:
        if role not in self.config.roles:
            raise CharterError(BAD_REQUEST, f"no role {role!r}; roles: {', '.join(sorted(self.config.roles))}", "role")
        ttl = self.config.identity.invite_ttl if ttl is None else ttl
        if not 0 < ttl <= self.config.identity.max_invite_ttl:
            raise CharterError(BAD_REQUEST, f"ttl must be between 1s and {self.config.identity.max_invite_ttl:g}s", "ttl")
        if not 1 <= uses <= 1000:
            raise CharterError(BAD_REQUEST, "uses must be between 1 and 1000", "uses")
        token = new_token()
        now = now_ms()
        inv = Invite(f"inv_{ULID()}", role, uses, uses, now, now + int(ttl * 1000), False, note[:200])
        self.registry.add_invite(inv, token_hash(token))
        await self.emit("charter.invites.created", {"invite_id": inv.id, "role": role, "uses": uses,
                                                   "expires_at": inv.expires_at})
        return token, inv

    async def revoke_invite(self, invite_id: str) -> None:
        self.registry.revoke_invite(invite_id)
        await self.emit("charter.invites.revoked", {"invite_id": invite_id})

    def _charter_body(self, agent_id: str, name: str, public_key: str, role_name: str, sandbox: str) -> dict[str, Any]:
        role = self.config.roles[role_name]
        policy = self.policies.get(role.policy)
        if policy is None:
            raise CharterError(CONFLICT, f"role {role_name!r} names policy {role.policy!r}, which is not in policies/", "policy")

        def fill(patterns: list[str]) -> list[str]:
            return [p.replace("{name}", name).replace("{id}", agent_id) for p in patterns]

        now = now_ms()
        ttl = role.charter_ttl or self.config.identity.charter_ttl
        return {
            "serial": str(ULID()),
            "agent_id": agent_id,
            "name": name,
            "public_key": public_key,
            "role": role_name,
            "scopes": {"publish": fill(role.publish), "subscribe": fill(role.subscribe), "read": fill(role.read)},
            "policy": policy.binding(),
            "max_tier": role.max_tier,
            "budget": {"usd_per_day": role.budget_usd_per_day, "tokens_per_day": role.budget_tokens_per_day},
            "sandbox": {"path": sandbox, "quota_bytes": role.sandbox_quota},
            "issued_at": now,
            "expires_at": now + int(ttl * 1000),
            "renew_after": now + int(max(ttl - self.config.identity.renew_before, ttl / 2) * 1000),
        }

    def _issue(self, body: dict[str, Any]) -> dict[str, Any]:
        return sign_charter(self.root_key, body)

    def _rebody(self, agent: AgentRecord, public_key: str) -> dict[str, Any]:
        """A fresh charter body for renewal or rotation; a sub-agent's stays cut from its live parent."""
        body = self._charter_body(agent.id, agent.name, public_key, agent.role, agent.charter["sandbox"]["path"])
        parent = agent.charter.get("parent")
        if parent:
            from charter.identity.delegation import recut

            body = recut(agent.charter, self.ensure_live(parent["agent_id"]).charter, body)
        return body

    async def enroll(self, request: dict[str, Any]) -> dict[str, Any]:
        """Redeem an invite for a new agent whose key was made where it runs; returns its charter."""
        token = request.get("token")
        name = request.get("name")
        pub = request.get("public_key")
        ts = request.get("ts")
        proof = request.get("proof")
        role = request.get("role")
        if not isinstance(token, str) or not looks_like_token(token):
            raise CharterError(BAD_TOKEN, "token is not a Charter invite token (chi_...)", "token")
        if not isinstance(name, str) or not AGENT_NAME.fullmatch(name):
            raise CharterError(BAD_REQUEST, "name must be lowercase letters, digits and '-', starting with a letter", "name")
        if role is not None and not isinstance(role, str):
            raise CharterError(BAD_REQUEST, "role must be a string", "role")
        try:
            public = PublicKey.from_b64(pub)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise CharterError(BAD_REQUEST, "public_key must be a base64url Ed25519 public key", "public_key") from None
        if type(ts) is not int or abs(now_ms() - ts) > self.replay.window_ms:
            raise CharterError(REPLAY, "enrolment request timestamp is outside the replay window", "ts")
        th = token_hash(token)
        try:
            from charter.encoding import b64d

            ok = isinstance(proof, str) and public.verify(b64d(proof), enroll_proof_message(th, name, public.b64, ts))
        except ValueError:
            ok = False
        if not ok:
            raise CharterError(BAD_SIGNATURE, "proof of possession does not verify with public_key", "proof")

        agent_id = f"agt_{ULID()}"
        sandbox_root = self.home.sandboxes_dir / agent_id

        def build(role_name: str) -> AgentRecord:
            if role_name not in self.config.roles:
                raise CharterError(BAD_TOKEN, f"this invite's role {role_name!r} no longer exists", "token")
            body = self._charter_body(agent_id, name, public.b64, role_name, str(sandbox_root))
            Sandbox(sandbox_root, body["sandbox"]["quota_bytes"]).create()
            charter = self._issue(body)
            return AgentRecord(
                id=agent_id, name=name, role=role_name, public_key=public, status=ACTIVE, reason="",
                charter=charter, issued_at=charter["issued_at"], expires_at=charter["expires_at"],
            )

        rec = self.registry.redeem(th, name=name, expected_role=role, build=build)
        api_key = new_api_key()
        self.registry.add_api_key(rec.id, token_hash(api_key))
        await self.emit("charter.agents.enrolled", {
            "agent_id": rec.id, "name": rec.name, "role": rec.role, "key_id": rec.public_key.key_id,
            "public_key": rec.public_key.b64,
            "policy": rec.charter["policy"], "expires_at": rec.expires_at,
        })
        return {"charter": rec.charter, "root_public_key": self.root_key.public.b64, "api_key": api_key}

    async def enroll_subagent(self, parent: AgentRecord, request: dict[str, Any]) -> dict[str, Any]:
        """An agent enrols a sub-agent whose key was made where it runs; delegation only narrows.

        The request is `{name, public_key, ts, proof[, scopes, max_tier, budget_usd_per_day,
        budget_tokens_per_day, sandbox_quota_bytes, wait]}`; `proof` signs
        `subagent_proof_message(parent id, ...)` with the new key. Every limit is checked against the
        parent's charter (`charter.identity.delegation`) before the parent's policy is asked about the
        action `agents.delegate` (an approval waits up to `wait` seconds).
        """
        from charter.identity import delegation

        parent = self.ensure_live(parent.id)
        name, pub, ts, proof = request.get("name"), request.get("public_key"), request.get("ts"), request.get("proof")
        if not isinstance(name, str) or not AGENT_NAME.fullmatch(name):
            raise CharterError(BAD_REQUEST, "name must be lowercase letters, digits and '-', starting with a letter", "name")
        try:
            public = PublicKey.from_b64(pub)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise CharterError(BAD_REQUEST, "public_key must be a base64url Ed25519 public key", "public_key") from None
        if type(ts) is not int or abs(now_ms() - ts) > self.replay.window_ms:
            raise CharterError(REPLAY, "enrolment request timestamp is outside the replay window", "ts")
        from charter.encoding import b64d

        try:
            ok = isinstance(proof, str) and public.verify(b64d(proof), subagent_proof_message(parent.id, name, public.b64, ts))
        except ValueError:
            ok = False
        if not ok:
            raise CharterError(BAD_SIGNATURE, "proof of possession does not verify with public_key", "proof")
        agent_id = f"agt_{ULID()}"
        scopes = delegation.narrow_scopes(parent.charter, request.get("scopes"), name, agent_id)
        max_tier = delegation.narrow_tier(parent.charter, request.get("max_tier"))
        budget = delegation.narrow_budget(parent.charter, request)
        quota = delegation.narrow_quota(parent.charter, request.get("sandbox_quota_bytes"))

        attrs = {"name": name, "max_tier": max_tier, "scopes": scopes}
        answer = await self.gov.act(parent, "agents.delegate", attrs)
        wait = request.get("wait") or 0
        if answer["effect"] == "approve" and isinstance(wait, int | float) and wait > 0:
            answer = {**answer, **(await self.gov.wait_approval(parent, answer["approval_id"], min(float(wait), 300.0)))}
        if answer["effect"] == "approve":
            from charter.governance import APPROVAL_REQUIRED

            raise CharterError(APPROVAL_REQUIRED, f"enrolling a sub-agent waits for the operator (approval "
                               f"{answer['approval_id']}); ask again with wait", "approval").with_details(answer)
        if answer["effect"] != "allow":
            reason = answer.get("reason") or answer.get("decision", {}).get("reason", "denied by policy")
            raise CharterError(POLICY_DENIED, f"agents.delegate: {reason}", "action").with_details(answer)

        sandbox_root = self.home.sandboxes_dir / agent_id
        body = self._charter_body(agent_id, name, public.b64, parent.role, str(sandbox_root))
        body.update(scopes=scopes, max_tier=max_tier, budget=budget, policy=parent.charter["policy"],
                    sandbox={"path": str(sandbox_root), "quota_bytes": quota},
                    parent={"agent_id": parent.id, "name": parent.name},
                    expires_at=min(body["expires_at"], parent.expires_at),
                    renew_after=min(body["renew_after"], parent.expires_at))
        charter = self._issue(body)
        rec = AgentRecord(id=agent_id, name=name, role=parent.role, public_key=public, status=ACTIVE, reason="",
                          charter=charter, issued_at=charter["issued_at"], expires_at=charter["expires_at"])
        Sandbox(sandbox_root, quota).create()
        rec = self.registry.insert(rec)
        api_key = new_api_key()
        self.registry.add_api_key(rec.id, token_hash(api_key))
        await self.emit("charter.agents.enrolled", {
            "agent_id": rec.id, "name": rec.name, "role": rec.role, "key_id": rec.public_key.key_id,
            "public_key": rec.public_key.b64, "policy": rec.charter["policy"], "expires_at": rec.expires_at,
            "parent": charter["parent"], "scopes": scopes, "max_tier": max_tier,
        })
        return {"charter": rec.charter, "root_public_key": self.root_key.public.b64, "api_key": api_key}

    # -- lifecycle -------------------------------------------------------------------------

    async def set_status(self, ref: str, action: str, reason: str = "") -> AgentRecord:
        rec = self.registry.find(ref)
        if rec.status == ST_REVOKED:
            raise CharterError(CONFLICT, f"agent {rec.name} is revoked; revocation is final", "agent")
        target = {"suspend": ST_SUSPENDED, "resume": ACTIVE, "revoke": ST_REVOKED}[action]
        if rec.status == target:
            return rec
        rec = self.registry.set_status(rec.id, target, reason)
        past = {"suspend": "suspended", "resume": "resumed", "revoke": "revoked"}[action]
        await self.emit(f"charter.agents.{past}", {"agent_id": rec.id, "name": rec.name, "reason": reason})
        if action == "revoke":  # delegation ends with the delegator: every descendant goes too
            for child in self.registry.children(rec.id):
                if child.status != ST_REVOKED:
                    await self.set_status(child.id, "revoke", f"parent {rec.name} was revoked"
                                          + (f": {reason}" if reason else ""))
        return rec

    async def renew(self, agent: AgentRecord, *, by_operator: bool = False) -> dict[str, Any]:
        """A fresh charter, re-derived from the role as it is configured now.

        An agent renews its own charter while it is live. Only the operator can renew one that has
        already expired (the agent then fetches it with its unchanged key); revoked stays revoked.
        """
        if by_operator:
            agent = self.registry.find(agent.id)
            if agent.status == ST_REVOKED:
                raise CharterError(CONFLICT, f"agent {agent.name} is revoked; revocation is final", "agent")
        else:
            agent = self.ensure_live(agent.id)
        body = self._rebody(agent, agent.public_key.b64)
        charter = self._issue(body)
        self.registry.replace_charter(agent, charter, agent.public_key)
        await self.emit("charter.agents.renewed", {"agent_id": agent.id, "name": agent.name,
                                                  "expires_at": charter["expires_at"], "by_operator": by_operator})
        return charter

    async def rotate_key(self, agent: AgentRecord, request: dict[str, Any]) -> dict[str, Any]:
        """Swap the agent's key for one it generated and proves it holds; the old key stops working."""
        agent = self.ensure_live(agent.id)
        pub, ts, proof = request.get("new_public_key"), request.get("ts"), request.get("proof")
        try:
            new = PublicKey.from_b64(pub)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise CharterError(BAD_REQUEST, "new_public_key must be a base64url Ed25519 public key", "new_public_key") from None
        if new == agent.public_key:
            raise CharterError(BAD_REQUEST, "the new key is the current key", "new_public_key")
        if type(ts) is not int or abs(now_ms() - ts) > self.replay.window_ms:
            raise CharterError(REPLAY, "rotation request timestamp is outside the replay window", "ts")
        from charter.encoding import b64d

        try:
            ok = isinstance(proof, str) and new.verify(b64d(proof), rotate_proof_message(agent.id, new.b64, ts))
        except ValueError:
            ok = False
        if not ok:
            raise CharterError(BAD_SIGNATURE, "proof of possession of the new key does not verify", "proof")
        body = self._rebody(agent, new.b64)
        charter = self._issue(body)
        old_id = agent.public_key.key_id
        self.registry.replace_charter(agent, charter, new)
        await self.emit("charter.agents.key_rotated", {"agent_id": agent.id, "name": agent.name,
                                                      "old_key_id": old_id, "new_key_id": new.key_id,
                                                      "public_key": new.b64})
        return charter

    async def new_api_key(self, agent: AgentRecord) -> str:
        """Replace the agent's bearer key (the old one stops working); shown once."""
        agent = self.ensure_live(agent.id)
        key = new_api_key()
        self.registry.add_api_key(agent.id, token_hash(key))
        await self.emit("charter.agents.api_key_rotated", {"agent_id": agent.id, "name": agent.name})
        return key

    def agent_for_bearer(self, header: str | None) -> AgentRecord:
        """The live agent a bearer key belongs to (revocation and suspension apply at once)."""
        if not header or not header.startswith("Bearer "):
            raise CharterError("unauthorized", "this call needs `Authorization: Bearer <api key from enrolment>`",
                               "authorization")
        agent = self.registry.agent_for_key(token_hash(header[7:].strip()))
        if agent is None:
            raise CharterError("unauthorized", "unknown or replaced API key", "authorization")
        return self.ensure_live(agent.id)

    def new_dashboard_token(self) -> str:
        """A login token for the dashboard (operator rights), shown by `charter up`; stored as a hash."""
        from charter.fsutil import write_private
        from charter.identity.tokens import b64e

        token = "chd_" + b64e(os.urandom(24))
        self.dashboard_token_hash = token_hash(token)
        write_private(self.home.run_dir / "dashboard.token", token.encode() + b"\n")
        return token

    def is_dashboard_token(self, header: str | None) -> bool:
        import hmac

        if not header or not header.startswith("Bearer chd_") or self.dashboard_token_hash is None:
            return False
        return hmac.compare_digest(token_hash(header[7:].strip()), self.dashboard_token_hash)

    def sandbox(self, agent: AgentRecord) -> Sandbox:
        sb = agent.charter.get("sandbox") or {}
        return Sandbox(self.home.sandboxes_dir / agent.id, int(sb.get("quota_bytes", 0)))

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        seq, head = await self.log.head()
        agents = self.registry.all()
        by_status: dict[str, int] = {}
        for a in agents:
            by_status[a.status] = by_status.get(a.status, 0) + 1
        return {
            "version": __version__,
            "home": str(self.home.root),
            "pid": os.getpid(),
            "uptime_s": round((now_ms() - self.started_at) / 1000, 1),
            "root_key_id": self.root_key.public.key_id,
            "log": {"backend": self.config.bus.backend, "head_seq": seq, "head_hash": head.hex()},
            "agents": by_status,
            "counters": dict(self.counters),
            "policies": {p.id: p.binding() for p in self.policies.values()},
            "roles": sorted(self.config.roles),
        }


def decode_json_body(body: bytes, what: str = "request") -> Any:
    try:
        return loads(body)
    except ValueError as exc:
        raise CharterError(MALFORMED, f"{what} body is not JSON: {exc}", "body") from None


def ms_to_iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))

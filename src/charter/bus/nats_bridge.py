"""Agents on NATS: the daemon's side of NATS-native enforcement (`[bus] nats_agents = true`).

- **Ingest.** The daemon serves `in.>` (queue group `charter-ingest`, so several daemons share the
  load). A message is one signed envelope; its NATS subject must be `in.` + the envelope's subject
  (the NATS server already checked that subject against the agent's user permissions). Then the
  envelope goes through the same gate as over HTTP (`Node.publish`: signature, replay, scope,
  policy) and the reply is the receipt `{seq, id, hash}` or `{"error": {code, message}}`.
- **Delivery.** Every entry appended to the log after the daemon started is published on
  `ev.<subject>` with a `Charter-Seq` header: at most once, core NATS. Agents that need every entry
  (durable, resumable) use `GET /v1/subscribe`. With several daemons on one log, turn `nats_fanout`
  on for exactly one of them, or subscribers see each entry once per daemon (the header tells).
- **Revocation.** The bridge reads the log's lifecycle events (enrolment, key rotation, suspension,
  resumption, revocation: signed by the root key) at start and then follows the log; on each it
  re-signs the account JWT with the revocations they imply (`nats_auth.Revocations`) and pushes it
  over a system-account connection. The NATS servers then drop the revoked user's connections.
  The log is shared, so every daemon computes the same revocations: one daemon's push never undoes
  another's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import UserString
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charter.bus import envelope as envmod
from charter.bus.nats_auth import (
    DELIVER_PREFIX,
    INGEST_QUEUE,
    PUBLISH_PREFIX,
    NatsAuthority,
    Revocations,
    inbox_prefix,
    push_account,
    server_account_iat,
)
from charter.encoding import canonical, loads
from charter.errors import NOT_FOUND, OUT_OF_SCOPE, CharterError, Rejection

if TYPE_CHECKING:
    from charter.identity.registry import AgentRecord
    from charter.node import Node

log = logging.getLogger("charter.nats")


def nats_dir(home_root: Path) -> Path:
    return home_root / "nats"


class NatsBridge:
    """Inert unless `[bus] nats_agents = true`; then started and closed with the Node."""

    def __init__(self, node: Node, enabled: bool) -> None:
        self.node = node
        self.enabled = enabled
        bus = node.config.bus
        self.urls = [bus.nats_url] if isinstance(bus.nats_url, str) else list(bus.nats_url)
        self.fanout = bus.nats_fanout
        self.authority: NatsAuthority | None = NatsAuthority(nats_dir(node.home.root)) if enabled else None
        self._nc: Any = None
        self._sys: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._follower: asyncio.Task[None] | None = None
        self.counters = {"ingested": 0, "refused": 0, "delivered": 0, "account_pushes": 0}
        self.revoked = Revocations()
        self._seen = 0  # the log entries learnt from, up to this seq

    @classmethod
    def for_node(cls, node: Node) -> NatsBridge:
        return cls(node, node.config.bus.nats_agents)

    async def start(self) -> None:
        if not self.enabled:
            return
        import nats

        assert self.authority is not None
        common: dict[str, Any] = {"servers": self.urls, "reconnect_time_wait": 0.2, "max_reconnect_attempts": 2,
                                  "error_cb": self._on_error}
        try:
            self._nc = await nats.connect(name="charter-ingest", **common,
                                          user_credentials=UserString(self.authority.service_creds()))
            self._sys = await nats.connect(name="charter-system", **common,
                                           user_credentials=UserString(self.authority.system_creds()))
        except Exception as exc:  # noqa: BLE001 - every way of failing to connect reads the same
            await self.close()
            raise CharterError("nats_unavailable", f"cannot reach NATS at {', '.join(self.urls)} as the operator's "
                               f"users: {exc!r} (is nats-server running with nats/server.conf?)", "bus.nats_url") from None
        for nc in (self._nc, self._sys):
            nc.options["max_reconnect_attempts"] = -1  # once up, ride out server restarts
        while entries := await self.node.log.read(self._seen, 2000):  # every lifecycle event so far
            for e in entries:
                self._learn(e)
            self._seen = entries[-1].seq
        await self.push_revocations()
        await self._nc.subscribe(f"{PUBLISH_PREFIX}.>", queue=INGEST_QUEUE, cb=self._on_envelope)
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        for t in list(self._tasks):
            t.cancel()
        for nc in (self._nc, self._sys):
            if nc is not None:
                try:
                    await nc.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
        self._nc = self._sys = None

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %r", exc)

    # -- credentials ----------------------------------------------------------------------

    def issue(self, agent: AgentRecord) -> dict[str, Any]:
        """A user JWT for a live agent; the agent adds its own seed (`charter.sdk.nats`)."""
        if self.authority is None:
            raise CharterError(NOT_FOUND, "this daemon gives no NATS credentials; set [bus] nats_agents = true "
                               "(docs/nats.md)", "nats")
        agent = self.node.ensure_live(agent.id)
        issued = self.authority.agent_jwt(agent.id, agent.name, agent.public_key.raw, agent.charter["scopes"],
                                          agent.expires_at)
        return {"jwt": issued.jwt, "user": issued.user, "servers": self.urls, "expires_at": issued.expires_at,
                "inbox_prefix": inbox_prefix(agent.id), "publish_prefix": PUBLISH_PREFIX,
                "deliver_prefix": DELIVER_PREFIX}

    async def push_revocations(self) -> None:
        assert self.authority is not None
        floor = await server_account_iat(self._sys, self.authority.account)
        jwt = self.authority.account_jwt(self.revoked.current(), after_iat=floor)
        await push_account(self._sys, jwt)
        self.counters["account_pushes"] += 1

    def _learn(self, entry: Any) -> bool:
        if not entry.subject.startswith("charter.agents."):
            return False
        return self.revoked.learn(entry.sender, entry.subject, loads(entry.raw).get("payload"), entry.ts)

    # -- ingest ---------------------------------------------------------------------------

    async def _on_envelope(self, msg: Any) -> None:
        # One task per message: appends queue up in arrival order and share JetStream messages.
        task = asyncio.get_running_loop().create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Any) -> None:
        subject = msg.subject[len(PUBLISH_PREFIX) + 1:]
        try:
            env = envmod.parse(msg.data, max_bytes=self.node.config.bus.max_envelope_bytes)
            if env.subject != subject:
                raise Rejection(OUT_OF_SCOPE, f"sent on NATS subject {msg.subject!r}, but the envelope's subject is "
                                f"{env.subject!r}", "subject")
            receipt = await self.node.publish(env)
            body = canonical(receipt.to_dict())
            self.counters["ingested"] += 1
        except CharterError as exc:
            body = canonical({"error": exc.to_dict()})
            self.counters["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the sender gets an answer whatever happened
            log.exception("ingest failed")
            body = canonical({"error": {"code": "internal", "message": repr(exc)}})
        if msg.reply:
            try:
                await self._nc.publish(msg.reply, body)
            except Exception:  # noqa: BLE001 - the requester may be gone
                pass

    # -- delivery and revocation ----------------------------------------------------------

    async def _follow(self) -> None:
        last = self._seen
        dirty = False  # a lifecycle event whose account update has not reached the servers yet
        while True:
            try:
                if dirty:
                    await self.push_revocations()
                    dirty = False
                head = await self.node.log.wait(last, 5.0)
                if head <= last:
                    continue
                for e in await self.node.log.read(last, 500):
                    last = e.seq
                    if self.fanout:
                        await self._nc.publish(f"{DELIVER_PREFIX}.{e.subject}", e.raw,
                                               headers={"Charter-Seq": str(e.seq), "Charter-Hash": e.hash.hex()})
                        self.counters["delivered"] += 1
                    dirty = self._learn(e) or dirty
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep following; the next round retries
                log.exception("nats follower")
                await asyncio.sleep(1.0)

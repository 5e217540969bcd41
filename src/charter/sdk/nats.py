"""An agent on NATS (docs/nats.md): its user JWT from the daemon, its own key as the NATS key.

    async with Agent.load("alpha.creds.json") as agent:
        bus = await NatsAgent.connect(agent)
        receipt = await bus.publish("agents.alpha.status", {"state": "ready"})
        sub = await bus.subscribe("tasks.>")          # core NATS delivery, at most once
        await bus.close()

The NATS server checks every publish and subscription against the permissions in the JWT. nats-py
reports such a refusal only through its error callback (and the server sometimes sends it a ping
later than the message it refuses), so `publish` waits for Charter's answer or the refusal,
whichever comes first, and `subscribe` for three pings; both raise `CharterError(out_of_scope)`
instead of timing out. Charter still checks every envelope (signature,
replay, scope, policy) and answers with the receipt or the refusal.
"""

from __future__ import annotations

import asyncio
from collections import UserString
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charter.bus.nats_auth import creds_text, user_seed
from charter.encoding import loads
from charter.errors import OUT_OF_SCOPE, CharterError
from charter.fsutil import write_private

if TYPE_CHECKING:
    from charter.sdk.agent import Agent


async def nats_credentials(agent: Agent) -> dict[str, Any]:
    """The daemon's answer (JWT, servers, prefixes) plus `creds`: the .creds text with the agent's seed."""
    answer = await agent.http.call("GET", "/v1/agent/nats")
    answer["creds"] = creds_text(answer["jwt"], user_seed(agent.creds.key.seed()))
    return answer


async def write_nats_creds(agent: Agent, path: Path) -> dict[str, Any]:
    """Write a `.creds` file (mode 0600) that any NATS client can use as this agent."""
    answer = await nats_credentials(agent)
    write_private(path, answer["creds"].encode())
    return answer


class NatsAgent:
    def __init__(self, agent: Agent, nc: Any, info: dict[str, Any]) -> None:
        self.agent, self.nc, self.info = agent, nc, info
        self.errors: list[str] = []
        self.disconnected = asyncio.Event()
        self._said = asyncio.Event()  # set (and replaced) whenever the server reports an error

    @classmethod
    async def connect(cls, agent: Agent, *, servers: list[str] | None = None, **options: Any) -> NatsAgent:
        import nats

        info = await nats_credentials(agent)
        holder: dict[str, NatsAgent] = {}

        async def on_error(exc: Exception) -> None:
            me = holder["me"]
            me.errors.append(str(exc))
            me._said.set()
            me._said = asyncio.Event()

        async def on_disconnect() -> None:
            holder["me"].disconnected.set()

        opts: dict[str, Any] = {"max_reconnect_attempts": 3, "reconnect_time_wait": 0.2,
                                "error_cb": on_error, "disconnected_cb": on_disconnect}
        opts.update(options)
        me = cls(agent, None, info)
        holder["me"] = me
        me.nc = await nats.connect(servers=servers or info["servers"], user_credentials=UserString(info["creds"]),
                                   inbox_prefix=info["inbox_prefix"], name=f"charter-agent-{agent.name}", **opts)
        return me

    def _refused(self, what: str, subject: str) -> bool:
        said = f"{what} to \"{subject}\"".lower()  # nats-py lower-cases the server's -ERR text
        return any(said in e.lower() for e in self.errors)

    async def publish(self, subject: str, payload: Any, kind: str = "event", *, timeout: float = 5.0) -> dict[str, Any]:
        """Publish one signed envelope on `in.<subject>`; returns the receipt `{seq, id, hash}`."""
        return await self.publish_envelope(self.agent.seal(subject, payload, kind), timeout=timeout)

    async def publish_envelope(self, env: Any, *, subject: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        wire = f"{self.info['publish_prefix']}.{subject or env.subject}"
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=1)
        reply: asyncio.Task[Any] | None = None
        try:
            await self.nc.publish(wire, env.raw, reply=inbox)
            # Charter's answer, or the server's refusal (which comes as an error, sometimes a ping late).
            reply = asyncio.ensure_future(sub.next_msg(timeout))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not reply.done():
                if self._refused("publish", wire):
                    raise CharterError(OUT_OF_SCOPE, f"the NATS server refused publishing to {wire!r} "
                                       "(outside this agent's NATS permissions)", "subject")
                said = asyncio.ensure_future(self._said.wait())
                await asyncio.wait({reply, said}, timeout=max(deadline - loop.time(), 0),
                                   return_when=asyncio.FIRST_COMPLETED)
                said.cancel()
                if loop.time() >= deadline:
                    break
            try:
                msg = reply.result() if reply.done() else await reply
            except Exception as exc:  # noqa: BLE001 - nats-py's timeout types vary by version
                raise CharterError("timeout", f"no answer from Charter on NATS within {timeout:g}s: {exc!r}",
                                   "nats") from None
        finally:
            if reply is not None and not reply.done():
                reply.cancel()
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - a closed connection
                pass
        doc = loads(msg.data)
        if "error" in doc:
            err = doc["error"]
            raise CharterError(err["code"], err["message"], err.get("where"))
        return doc

    async def subscribe(self, pattern: str, cb: Any = None) -> Any:
        """Core NATS delivery of accepted envelopes on `ev.<pattern>` (at most once; see docs/nats.md)."""
        wire = f"{self.info['deliver_prefix']}.{pattern}"
        sub = await self.nc.subscribe(wire, cb=cb)
        for _ in range(3):  # the server's refusal can come a ping later than the subscription
            await self.nc.flush()
            if self._refused("subscription", wire):
                break
        if self._refused("subscription", wire):
            raise CharterError(OUT_OF_SCOPE, f"the NATS server refused a subscription to {wire!r}", "pattern")
        return sub

    async def close(self) -> None:
        try:
            await self.nc.close()
        except Exception:  # noqa: BLE001
            pass

"""`Agent`: an enrolled agent's side of Charter.

    agent = await Agent.enroll("http://127.0.0.1:7477", token, "alpha", "alpha.creds")
    await agent.publish("agents.alpha.events", {"hello": "world"})
    async for event in agent.subscribe("tasks.>"):
        ...

Every envelope is signed here, with a key that was generated here and never leaves.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from charter.bus.envelope import Envelope, seal
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.identity.proofs import enroll_proof_message, rotate_proof_message, subagent_proof_message
from charter.identity.tokens import token_hash
from charter.sdk.credentials import Credentials
from charter.sdk.http import SignedClient


@dataclass(frozen=True, slots=True)
class Event:
    """One log entry delivered to a subscriber."""

    seq: int
    hash: str
    envelope: dict[str, Any]

    @property
    def subject(self) -> str:
        return self.envelope["subject"]

    @property
    def sender(self) -> str:
        return self.envelope["sender"]

    @property
    def payload(self) -> Any:
        return self.envelope["payload"]

    @property
    def kind(self) -> str:
        return self.envelope["kind"]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Agent:
    def __init__(self, creds: Credentials, path: Path | None = None, *, server: str | None = None) -> None:
        self.creds = creds
        self.path = path
        self.http = SignedClient(server or creds.server, creds.agent_id, creds.key)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, server: str | None = None) -> Agent:
        """Load credentials written by `enroll`; checks the charter's root signature."""
        creds = Credentials.load(path)
        creds.check()
        return cls(creds, Path(path), server=server)

    @classmethod
    async def enroll(cls, server: str, token: str, name: str, path: str | Path | None = None,
                     *, role: str | None = None) -> Agent:
        """Generate a key here, prove it to the daemon with the invite, and save the credentials."""
        key = SigningKey.generate()
        ts = _now_ms()
        proof = key.sign_b64(enroll_proof_message(token_hash(token), name, key.public.b64, ts))
        request: dict[str, Any] = {"token": token, "name": name, "public_key": key.public.b64, "ts": ts, "proof": proof}
        if role:
            request["role"] = role
        client = SignedClient(server)
        try:
            answer = await client.call("POST", "/v1/enroll", json=request, signed=False)
        finally:
            await client.close()
        charter = answer["charter"]
        creds = Credentials(charter["agent_id"], charter["name"], server.rstrip("/"), key, charter,
                            answer["root_public_key"], answer.get("api_key"))
        creds.check()
        target = Path(path) if path else None
        if target:
            creds.save(target)
        return cls(creds, target)

    async def enroll_subagent(self, name: str, path: str | Path | None = None, *,
                              scopes: dict[str, list[str]] | None = None, max_tier: str | None = None,
                              budget_usd_per_day: float | None = None, budget_tokens_per_day: int | None = None,
                              sandbox_quota_bytes: int | None = None, wait: float = 0.0) -> Agent:
        """Enrol a sub-agent: a new key made here, a charter cut from this agent's own.

        `scopes` (`{"publish": [...], "subscribe": [...], "read": [...]}`, `{name}` is the child's
        name) and the other limits default to this agent's and may only narrow them: asking for more
        is refused with `out_of_scope`, naming the pattern or limit. Revoking this agent revokes the
        sub-agent. Enrolling is the policy action `agents.delegate`; `wait` holds for an approval.
        """
        key = SigningKey.generate()
        ts = _now_ms()
        request: dict[str, Any] = {
            "name": name, "public_key": key.public.b64, "ts": ts,
            "proof": key.sign_b64(subagent_proof_message(self.id, name, key.public.b64, ts)),
        }
        for field, value in (("scopes", scopes), ("max_tier", max_tier), ("budget_usd_per_day", budget_usd_per_day),
                             ("budget_tokens_per_day", budget_tokens_per_day),
                             ("sandbox_quota_bytes", sandbox_quota_bytes)):
            if value is not None:
                request[field] = value
        if wait:
            request["wait"] = wait
        answer = await self.http.call("POST", "/v1/agent/subagents", json=request)
        charter = answer["charter"]
        creds = Credentials(charter["agent_id"], charter["name"], self.http.base_url, key, charter,
                            answer["root_public_key"], answer.get("api_key"))
        creds.check()
        target = Path(path) if path else None
        if target:
            creds.save(target)
        return Agent(creds, target)

    async def subagents(self) -> list[dict[str, Any]]:
        return (await self.http.call("GET", "/v1/agent/subagents"))["subagents"]

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def id(self) -> str:
        return self.creds.agent_id

    @property
    def name(self) -> str:
        return self.creds.name

    # -- the bus ---------------------------------------------------------------------------

    def seal(self, subject: str, payload: Any, kind: str = "event") -> Envelope:
        """A signed envelope, ready for the wire (publishing it is `publish_envelope`)."""
        return seal(self.creds.key, sender=self.creds.agent_id, subject=subject, payload=payload, kind=kind)

    async def publish(self, subject: str, payload: Any, kind: str = "event") -> dict[str, Any]:
        """Publish and wait until the envelope is durable; returns `{seq, id, hash}`."""
        return await self.publish_envelope(self.seal(subject, payload, kind))

    async def publish_envelope(self, env: Envelope) -> dict[str, Any]:
        return await self.http.call("POST", "/v1/publish", body=env.raw, signed=False)

    async def publish_many(self, items: Sequence[tuple[str, Any]], kind: str = "event") -> list[dict[str, Any]]:
        """Publish many in one request and one durable commit. Each result is a receipt or an error."""
        envs = [self.seal(subject, payload, kind) for subject, payload in items]
        body = b"[" + b",".join(e.raw for e in envs) + b"]"
        answer = await self.http.call("POST", "/v1/publish/batch", body=body, signed=False)
        return answer["results"]

    async def subscribe(self, pattern: str = ">", *, from_seq: int | None = None,
                        consumer: str | None = None) -> AsyncIterator[Event]:
        """Events matching `pattern`: from `from_seq` (or where `consumer` left off), then live ones."""
        params = {"pattern": pattern, "from_seq": from_seq, "consumer": consumer}
        async for event, data in self.http.sse("/v1/subscribe", params):
            if event == "error":
                err = orjson.loads(data)
                raise CharterError(err["code"], err["message"], err.get("where"))
            if event == "envelope":
                doc = orjson.loads(data)
                yield Event(doc["seq"], doc["hash"], doc["envelope"])

    async def ack(self, consumer: str, seq: int) -> dict[str, Any]:
        """Acknowledge everything up to `seq` for a durable consumer."""
        return await self.http.call("POST", f"/v1/consumers/{quote(consumer, safe='')}/ack", json={"seq": seq})

    async def recent(self, pattern: str = ">", limit: int = 50) -> list[Event]:
        answer = await self.http.call("GET", "/v1/events", params={"pattern": pattern, "limit": limit})
        return [Event(e["seq"], e["hash"], e["envelope"]) for e in answer["events"]]

    # -- identity --------------------------------------------------------------------------

    async def charter(self) -> dict[str, Any]:
        """The charter as the daemon holds it now (the local copy may be older)."""
        return (await self.http.call("GET", "/v1/agent/charter"))["charter"]

    def needs_renewal(self, now_ms: int | None = None) -> bool:
        return (now_ms or _now_ms()) >= int(self.creds.charter.get("renew_after", self.creds.charter["expires_at"]))

    async def renew(self) -> dict[str, Any]:
        charter = (await self.http.call("POST", "/v1/agent/renew"))["charter"]
        self._store(charter, self.creds.key)
        return charter

    async def refresh(self) -> dict[str, Any]:
        """Fetch the charter the daemon holds now (e.g. after the operator renewed it) and keep it."""
        charter = await self.charter()
        self._store(charter, self.creds.key)
        return charter

    async def renew_if_due(self) -> bool:
        if self.needs_renewal():
            await self.renew()
            return True
        return False

    async def rotate_key(self) -> dict[str, Any]:
        """Generate a new key here, prove it, and switch to it; the old key stops working at once."""
        new = SigningKey.generate()
        ts = _now_ms()
        proof = new.sign_b64(rotate_proof_message(self.creds.agent_id, new.public.b64, ts))
        answer = await self.http.call("POST", "/v1/agent/rotate-key",
                                      json={"new_public_key": new.public.b64, "ts": ts, "proof": proof})
        self._store(answer["charter"], new)
        return answer["charter"]

    def _store(self, charter: dict[str, Any], key: SigningKey) -> None:
        self.creds.charter, self.creds.key = charter, key
        self.creds.check()
        self.http.key = key
        if self.path:
            self.creds.save(self.path)

    # -- actions, approvals, budgets --------------------------------------------------------

    async def act(self, action: str, attrs: dict[str, Any] | None = None, *, wait: float = 0.0) -> dict[str, Any]:
        """Ask the bound policy whether `action` may run. `effect` is allow, deny or approve.

        With `wait`, an action that needs an approval waits up to that many seconds for the
        operator; approved, it comes back `allow` (and a one-shot approval is used up by this call).
        """
        body: dict[str, Any] = {"action": action, "attrs": attrs or {}}
        if wait:
            body["wait"] = f"{wait:g}s"
        return await self.http.call("POST", "/v1/agent/act", json=body)

    async def wait_approval(self, approval_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for an approval's decision; `effect` is allow (claimed now), deny, or approve (still pending)."""
        return await self.http.call("GET", f"/v1/agent/approvals/{quote(approval_id, safe='')}",
                                    params={"wait": f"{timeout:g}s"})

    async def budget(self) -> dict[str, Any]:
        return await self.http.call("GET", "/v1/agent/budget")

    async def reserve(self, *, model: str = "", input_tokens: int = 0, max_output_tokens: int = 0,
                      usd: float | None = None, action: str = "model.call",
                      approval_id: str | None = None) -> dict[str, Any]:
        """Reserve budget before a paid call; raises CharterError `budget_exceeded` with what is left.

        A spend whose tier needs an approval answers `approval_required` until one is granted: ask
        with `act()`, then pass the approval's id here (a one-shot approval pays for
        exactly one reservation; a window approval is found without it)."""
        body: dict[str, Any] = {"model": model, "input_tokens": input_tokens,
                                "max_output_tokens": max_output_tokens, "action": action}
        if usd is not None:
            body["usd"] = usd
        if approval_id is not None:
            body["approval_id"] = approval_id
        return await self.http.call("POST", "/v1/agent/budget/reserve", json=body)

    async def settle(self, reservation_id: str, *, tokens_in: int = 0, tokens_out: int = 0,
                     usd: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"reservation_id": reservation_id, "tokens_in": tokens_in, "tokens_out": tokens_out}
        if usd is not None:
            body["usd"] = usd
        return await self.http.call("POST", "/v1/agent/budget/settle", json=body)

    async def release(self, reservation_id: str) -> dict[str, Any]:
        return await self.http.call("POST", "/v1/agent/budget/release", json={"reservation_id": reservation_id})

    async def capsule(self, name: str = "AGENT") -> dict[str, Any]:
        """This agent's capsule (or another per-agent spec), rebuilt now from what its view allows:
        `markdown`, `meta`, `path`."""
        return await self.http.call("GET", "/v1/agent/capsule", params={"name": name})

    # -- models ----------------------------------------------------------------------------

    @property
    def api_key(self) -> str | None:
        """The bearer key for pointing an unmodified OpenAI or Ollama client at Charter."""
        return self.creds.api_key

    @property
    def openai_base_url(self) -> str:
        return self.http.base_url + "/v1"

    async def rotate_api_key(self) -> str:
        key = (await self.http.call("POST", "/v1/agent/api-key"))["api_key"]
        self.creds.api_key = key
        if self.path:
            self.creds.save(self.path)
        return key

    # -- the sandbox -----------------------------------------------------------------------

    async def sandbox_list(self) -> dict[str, Any]:
        return await self.http.call("GET", "/v1/agent/sandbox")

    async def sandbox_write(self, path: str, data: bytes) -> dict[str, Any]:
        return await self.http.call("PUT", "/v1/agent/sandbox/files/" + quote(path, safe=""), body=data)

    async def sandbox_read(self, path: str) -> bytes:
        return await self.http.call("GET", "/v1/agent/sandbox/files/" + quote(path, safe=""), raw=True)

"""What the MCP tools need from Charter, for one enrolled agent, in two implementations.

* `SdkBackend`: the agent's own process (`charter mcp --creds FILE`, and the proxy). It holds the
  agent's key and talks to the daemon with the SDK, so everything it publishes is signed by the
  agent and checked by the bus like any other envelope.
* `NodeBackend`: inside the daemon, for the streamable HTTP endpoint, where the caller proved who it
  is with its bearer key. The daemon does not hold the agent's private key, so what it publishes for
  the agent is signed by the root key (sender `operator`), after the same checks the bus would make
  (live agent, publish scope, `bus.publish` policy, size), with the payload wrapped as
  `{"on_behalf_of": {"agent_id", "name"}, "via": "mcp", "payload": ...}`. `unwrap` undoes that for
  readers, and only for envelopes the operator signed, so an agent cannot forge it.

Every method raises `CharterError` with the daemon's stable codes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol

from charter.bus.subjects import SubjectError, validate_subject
from charter.encoding import canonical, loads
from charter.errors import BAD_REQUEST, MALFORMED, NOT_FOUND, OUT_OF_SCOPE, POLICY_DENIED, TOO_LARGE, CharterError
from charter.identity.registry import OPERATOR_ID

MAX_WAIT = 300.0  # the daemon never holds an approval wait longer than this
_SDK_CHUNK = 25.0  # the SDK's HTTP client gives up after 30 s: wait in shorter requests
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")  # the envelope's grammar for `kind`


class Backend(Protocol):
    @property
    def agent_id(self) -> str: ...
    @property
    def name(self) -> str: ...

    async def charter(self) -> dict[str, Any]: ...
    async def check(self, action: str, attrs: dict[str, Any] | None = None) -> dict[str, Any]: ...
    async def publish(self, subject: str, payload: Any, kind: str = "event") -> dict[str, Any]: ...
    async def recent(self, pattern: str, limit: int) -> list[dict[str, Any]]: ...
    async def act(self, action: str, attrs: dict[str, Any], wait: float = 0.0) -> dict[str, Any]: ...
    async def budget(self) -> dict[str, Any]: ...
    async def capsule(self) -> dict[str, Any]: ...


def unwrap(entry: dict[str, Any]) -> dict[str, Any]:
    """A log entry `{seq, envelope}` as a flat event; daemon-published MCP events name their agent."""
    env = entry["envelope"]
    payload = env["payload"]
    out = {"seq": entry["seq"], "subject": env["subject"], "sender": env["sender"], "kind": env["kind"],
           "ts": env["ts"], "payload": payload}
    if (env["sender"] == OPERATOR_ID and isinstance(payload, dict) and set(payload) >= {"on_behalf_of", "payload"}
            and payload.get("via") == "mcp"):
        out["payload"] = payload["payload"]
        out["on_behalf_of"] = payload["on_behalf_of"]
    return out


def require_allowed(decision: dict[str, Any], action: str) -> None:
    """Refuse unless the policy allows `action` outright (reads never wait for an approval)."""
    if decision.get("effect") != "allow":
        raise CharterError(POLICY_DENIED, f"{action}: {decision.get('reason', 'denied by policy')}",
                           "action").with_details({"decision": decision})


class SdkBackend:
    """The agent's side: its key signs, the daemon checks."""

    def __init__(self, agent: Any) -> None:  # charter.sdk.Agent (imported lazily by callers)
        self.agent = agent

    @property
    def agent_id(self) -> str:
        return self.agent.id

    @property
    def name(self) -> str:
        return self.agent.name

    async def charter(self) -> dict[str, Any]:
        return await self.agent.charter()

    async def check(self, action: str, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        return (await self.agent.http.call("POST", "/v1/agent/policy/check",
                                           json={"action": action, "attrs": attrs or {}}))["decision"]

    async def visible(self, actions: list[str]) -> dict[str, bool]:
        return (await self.agent.http.call("POST", "/v1/agent/policy/visible", json={"actions": actions}))["visible"]

    async def publish(self, subject: str, payload: Any, kind: str = "event") -> dict[str, Any]:
        return await self.agent.publish(subject, payload, kind)

    async def recent(self, pattern: str, limit: int) -> list[dict[str, Any]]:
        answer = await self.agent.http.call("GET", "/v1/events", params={"pattern": pattern, "limit": limit})
        return [unwrap(e) for e in answer["events"]]

    async def act(self, action: str, attrs: dict[str, Any], wait: float = 0.0) -> dict[str, Any]:
        """Decide; with `wait`, hold an approval-bound action until the operator decides (or the time is up)."""
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        result = await self.agent.act(action, attrs, wait=min(max(wait, 0.0), _SDK_CHUNK))
        return await self._keep_waiting(result, deadline)

    async def wait_approval(self, approval_id: str, wait: float) -> dict[str, Any]:
        """Wait for a decision on an approval this agent asked for; allow means it is claimed (once) now."""
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        step = await self.agent.wait_approval(approval_id, timeout=min(max(wait, 0.0), _SDK_CHUNK))
        return await self._keep_waiting({"approval_id": approval_id, **step}, deadline)

    async def _keep_waiting(self, result: dict[str, Any], deadline: float) -> dict[str, Any]:
        while result.get("effect") == "approve" and result.get("approval_id"):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            step = await self.agent.wait_approval(result["approval_id"], timeout=min(left, _SDK_CHUNK))
            result = {**result, **step}
        return result

    async def budget(self) -> dict[str, Any]:
        return await self.agent.budget()

    async def capsule(self) -> dict[str, Any]:
        try:
            return await self.agent.capsule()
        except CharterError as exc:
            if exc.code in ("http_error", NOT_FOUND) and "capsule" not in exc.message:
                raise CharterError(NOT_FOUND, "capsules are not available from this daemon yet", "capsule") from None
            raise


class NodeBackend:
    """Inside the daemon, for an agent authenticated by its bearer key; re-checked on every call."""

    def __init__(self, node: Any, agent_id: str) -> None:  # charter.node.Node
        self.node = node
        self._id = agent_id

    @property
    def rec(self) -> Any:
        return self.node.ensure_live(self._id)

    @property
    def agent_id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self.node.lookup(self._id).name

    async def charter(self) -> dict[str, Any]:
        return self.rec.charter

    async def check(self, action: str, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.node.gov.evaluate(self.rec, action, attrs or {}).to_dict()

    async def visible(self, actions: list[str]) -> dict[str, bool]:
        from charter.mcp.visibility import visible

        rec = self.rec
        policy = self.node.gov.bound_policy(rec)
        return visible(policy.engine if policy else None, self.node.gov.subject(rec), actions)

    async def publish(self, subject: str, payload: Any, kind: str = "event") -> dict[str, Any]:
        rec = self.rec
        try:
            validate_subject(subject)
        except SubjectError as exc:
            raise CharterError(MALFORMED, str(exc), "subject") from None
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise CharterError(MALFORMED, "kind must be a lowercase token such as 'event'", "kind")
        if not rec.publish.allows(subject):
            raise CharterError(OUT_OF_SCOPE, f"{rec.name} may not publish to {subject!r}", "subject")
        d = self.node.gov.evaluate(rec, "bus.publish", {"subject": subject, "kind": kind})
        if not d.allowed:
            raise CharterError(POLICY_DENIED, d.reason, "subject")
        body = {"on_behalf_of": {"agent_id": rec.id, "name": rec.name}, "via": "mcp", "payload": payload}
        try:
            size = len(canonical(body))
        except (TypeError, ValueError) as exc:
            raise CharterError(MALFORMED, f"payload is not JSON: {exc}", "payload") from None
        if size > self.node.config.bus.max_envelope_bytes - 1024:
            raise CharterError(TOO_LARGE, "payload is larger than the bus accepts in one envelope", "payload")
        return (await self.node.emit(subject, body, kind)).to_dict()

    async def recent(self, pattern: str, limit: int) -> list[dict[str, Any]]:
        entries = await self.node.read_recent(self.rec, pattern, max(1, min(limit, 5000)))
        return [unwrap({"seq": e.seq, "envelope": loads(e.raw)}) for e in entries]

    async def act(self, action: str, attrs: dict[str, Any], wait: float = 0.0) -> dict[str, Any]:
        if not isinstance(attrs, dict):
            raise CharterError(BAD_REQUEST, "attrs must be a JSON object", "attrs")
        rec = self.rec
        result = await self.node.gov.act(rec, action, attrs)
        if result["effect"] == "approve" and wait > 0:
            result = {**result, **(await self.node.gov.wait_approval(rec, result["approval_id"], min(wait, MAX_WAIT)))}
        return result

    async def budget(self) -> dict[str, Any]:
        return await self.node.gov.budget_view(self.rec)

    async def capsule(self) -> dict[str, Any]:
        capsules = getattr(self.node, "capsules", None)
        if capsules is None:
            raise CharterError(NOT_FOUND, "capsules are not available from this daemon yet", "capsule")
        return await capsules.build("AGENT", self.rec)

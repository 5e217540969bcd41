"""Signature checks over a whole log, using nothing but the log itself and the root public key.

Every enrolment and key rotation is an event signed by the root key that carries the agent's
public key, so replaying the log in order tells which key every later entry must verify with. A
well-linked entry forged with any other key, or sent by a revoked agent, is caught.
"""

from __future__ import annotations

from charter.bus.envelope import Envelope
from charter.encoding import b64d
from charter.identity.keys import PublicKey
from charter.identity.registry import OPERATOR_ID


class KeyWitness:
    def __init__(self, root: PublicKey) -> None:
        self.root = root
        self.keys: dict[str, PublicKey] = {}
        self.status: dict[str, str] = {}

    def snapshot(self) -> dict[str, dict[str, str]]:
        """What the witness knows, as JSON-able data: kept where older entries were pruned."""
        return {"keys": {a: k.b64 for a, k in self.keys.items()}, "status": dict(self.status)}

    def restore(self, snapshot: dict[str, dict[str, str]]) -> None:
        """Continue from a snapshot (the log's retention boundary) instead of the first entry."""
        for agent, key in (snapshot.get("keys") or {}).items():
            try:
                self.keys[agent] = PublicKey.from_b64(key)
            except (ValueError, TypeError):
                continue
        self.status.update({a: s for a, s in (snapshot.get("status") or {}).items() if isinstance(s, str)})

    def check(self, env: Envelope) -> str | None:
        """None if `env` is signed by the key its sender held at that point; else why not."""
        if env.sender == OPERATOR_ID:
            key = self.root
        else:
            key = self.keys.get(env.sender)
            if key is None:
                return f"sender {env.sender} was never enrolled in this log"
            state = self.status.get(env.sender)
            if state in ("revoked", "suspended"):
                return f"sender {env.sender} was {state} when this entry was written"
        try:
            ok = key.verify(b64d(env.sig), env.signed)
        except ValueError:
            ok = False
        if not ok:
            return "signature does not verify with the " + ("root key" if key is self.root else "sender's key")
        if env.sender == OPERATOR_ID:
            self._learn(env)
        return None

    def _learn(self, env: Envelope) -> None:
        p = env.payload if isinstance(env.payload, dict) else {}
        agent = p.get("agent_id")
        if not isinstance(agent, str):
            return
        subject = env.subject
        if subject in ("charter.agents.enrolled", "charter.agents.key_rotated"):
            try:
                self.keys[agent] = PublicKey.from_b64(p["public_key"])
            except (KeyError, ValueError, TypeError):
                self.keys.pop(agent, None)
            if subject == "charter.agents.enrolled":
                self.status[agent] = "active"
        elif subject in ("charter.agents.suspended", "charter.agents.revoked"):
            self.status[agent] = subject.rsplit(".", 1)[1]
        elif subject == "charter.agents.resumed":
            self.status[agent] = "active"

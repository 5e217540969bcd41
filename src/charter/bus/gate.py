"""The verification pipeline: every envelope passes each step or is refused with that step's code.

Order matters. Cheap structural checks come first; the signature is checked before the nonce is
taken, so a forger cannot burn an honest agent's nonces; scope and policy come last, once the
sender is proven.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from charter.bus.envelope import Envelope
from charter.bus.replay import ReplayGuard
from charter.encoding import b64d
from charter.errors import (
    BAD_SIGNATURE,
    EXPIRED,
    OUT_OF_SCOPE,
    POLICY_DENIED,
    REPLAY,
    REVOKED,
    SUSPENDED,
    UNKNOWN_SENDER,
    Rejection,
)
from charter.identity.registry import REVOKED as ST_REVOKED
from charter.identity.registry import SUSPENDED as ST_SUSPENDED
from charter.identity.registry import AgentRecord
from charter.policy.hook import PolicyHook, ScopeOnly


class Gate:
    def __init__(
        self,
        lookup: Callable[[str], AgentRecord | None],
        replay: ReplayGuard,
        policy: PolicyHook | None = None,
    ) -> None:
        self.lookup = lookup
        self.replay = replay
        self.policy: PolicyHook = policy or ScopeOnly()

    def check(self, env: Envelope, now: int | None = None, *, signed_here: bool = False) -> AgentRecord:
        """Return the proven sender, or raise Rejection. On success the nonce is taken.

        `signed_here` is for envelopes this process has just sealed with the sender's own key (the
        operator's events): the signature check is skipped, every other step still runs.
        """
        now = time.time_ns() // 1_000_000 if now is None else now
        agent = self.lookup(env.sender)
        if agent is None:
            raise Rejection(UNKNOWN_SENDER, f"no enrolled agent has id {env.sender!r}", "sender")
        if agent.status == ST_REVOKED:
            raise Rejection(REVOKED, f"agent {agent.name} was revoked", "sender")
        if agent.status == ST_SUSPENDED:
            raise Rejection(SUSPENDED, f"agent {agent.name} is suspended; the operator can resume it", "sender")
        if now >= agent.expires_at:
            raise Rejection(EXPIRED, f"agent {agent.name}'s charter expired; renew it", "sender")
        if not signed_here:
            try:
                sig = b64d(env.sig)
            except ValueError:
                raise Rejection(BAD_SIGNATURE, "signature is not base64url", "sig") from None
            if not agent.public_key.verify(sig, env.signed):
                raise Rejection(BAD_SIGNATURE, f"signature does not match {agent.name}'s key", "sig")
        why = self.replay.check(env.sender, env.nonce, env.ts, now)
        if why:
            raise Rejection(REPLAY, why, "ts" if "timestamp" in why else "nonce")
        try:
            if not agent.publish.allows(env.subject):
                raise Rejection(
                    OUT_OF_SCOPE, f"{agent.name} may not publish to {env.subject!r}", "subject"
                )
            decision = self.policy.decide(agent, env)
            if not decision.allowed:
                raise Rejection(POLICY_DENIED, f"{decision.reason} (rule {decision.rule})", "policy")
        except Rejection:
            self.replay.release(env.sender, env.nonce)
            raise
        return agent

"""The policy step of the bus pipeline.

The gate calls `decide` after identity, signature, replay and scope have passed; a decision that
is not `allowed` becomes the rejection code `policy_denied`. `ScopeOnly` is for embedding the bus
without policies (tests of the bus alone); the daemon uses the agent's bound policy
(`charter.governance.Governance.bus_hook`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from charter.policy.engine import ALLOW, Decision

if TYPE_CHECKING:
    from charter.bus.envelope import Envelope
    from charter.identity.registry import AgentRecord

ALLOW_IN_SCOPE = Decision(ALLOW, "scope", "T0", "inside the agent's scoped view")


class PolicyHook(Protocol):
    def decide(self, agent: AgentRecord, envelope: Envelope) -> Decision: ...


class ScopeOnly:
    def decide(self, agent: AgentRecord, envelope: Envelope) -> Decision:
        return ALLOW_IN_SCOPE

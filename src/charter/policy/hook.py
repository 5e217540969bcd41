"""The policy step of the bus pipeline.

The gate calls `decide` after identity, signature, replay and scope have passed. This default
hook allows what the scope allowed; the policy engine replaces it with rule evaluation, risk tiers
and approvals, and a denial becomes the rejection code `policy_denied`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from charter.bus.envelope import Envelope
    from charter.identity.registry import AgentRecord


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    rule: str
    reason: str


ALLOW_IN_SCOPE = Decision(True, "scope", "inside the agent's scoped view")


class PolicyHook(Protocol):
    def decide(self, agent: AgentRecord, envelope: Envelope) -> Decision: ...


class ScopeOnly:
    """Until rules are evaluated, the scoped view is the whole policy."""

    def decide(self, agent: AgentRecord, envelope: Envelope) -> Decision:
        return ALLOW_IN_SCOPE

"""Which actions could the agent's bound policy ever allow? Used to hide MCP tools.

A tool is hidden only when *every* possible call of it is denied: no rule that could match its
action name allows it (or asks for an approval) within the agent's `max_tier`. The walk follows
`PolicyEngine.decide` rule by rule, in order:

* a rule whose condition uses only `action` and `agent` is evaluated now (both are known), so
  `when = 'action.matches("delete")'` decides definitely for a given tool name;
* a condition over the call's arguments may or may not hold: the walk keeps looking below it;
* an unconditional deny rule, or an unconditional allow/approve rule above the agent's `max_tier`,
  ends the walk: every call that reaches it is denied.

It errs on the side of showing a tool: a condition that can never hold still shows the tool, and
its calls are then refused one by one. Hiding is a convenience for the assistant, never the
enforcement: every call is decided again by the daemon.
"""

from __future__ import annotations

from typing import Any

from charter.policy.cel_runtime import cel
from charter.policy.engine import APPROVE, DENY, TIERS, PolicyEngine, Rule, Subject

_KNOWN_NOW = frozenset({"action", "agent"})


def _condition(rule: Rule, subject: Subject, action: str) -> bool | None:
    """True/False when the condition can be decided from the action name alone; None otherwise.

    A condition that raises is "not held" for an allow rule and "held" for deny and approve rules,
    as in `PolicyEngine.decide` (fail closed).
    """
    if rule.program is None:
        return True
    try:
        names = set(rule.program.variables())
    except Exception:  # noqa: BLE001 - an introspection failure only makes the answer uncertain
        return None
    if not names <= _KNOWN_NOW:
        return None
    try:
        return rule.program.execute(cel.Context({"action": action, "agent": subject.as_cel()})) is True
    except Exception:  # noqa: BLE001 - decide() treats a failing condition the same way
        return rule.effect in (DENY, APPROVE)


def may_allow(engine: PolicyEngine, subject: Subject, action: str) -> bool:
    """False when the policy denies every possible call of `action` for this subject."""
    limit = TIERS.index(subject.max_tier)
    for rule in engine.candidates(action):
        held = _condition(rule, subject, action)
        if held is False:
            continue
        denies = rule.effect == DENY or TIERS.index(rule.tier) > limit
        if not denies:
            return True  # allow, or approve within the tier: some call can go through
        if held is True:
            return False  # every call that gets this far is denied
    return False  # nothing matches: unknown actions are denied


def visible(engine: PolicyEngine | None, subject: Subject, actions: list[str]) -> dict[str, Any]:
    """`{action: bool}` for a list of action names; without a known policy nothing is visible."""
    if engine is None:
        return {a: False for a in actions}
    return {a: may_allow(engine, subject, a) for a in actions}

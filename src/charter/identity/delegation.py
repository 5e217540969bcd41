"""Sub-agents: delegation only narrows.

An enrolled agent may enrol a sub-agent whose charter is cut from its own: every publish, subscribe
and read pattern it asks for must lie within one of the parent's patterns of the same kind
(`charter.bus.subjects.pattern_within`), its `max_tier` is at most the parent's, its daily budget and
sandbox quota at most the parent's, and its charter never outlives the parent's. The charter names
the parent (`parent: {agent_id, name}`); revoking the parent revokes every descendant
(`Node.set_status`), and a renewal re-cuts the child from the parent as it is then.
"""

from __future__ import annotations

from typing import Any

from charter.bus.subjects import SubjectError, pattern_within, validate_pattern
from charter.errors import BAD_REQUEST, OUT_OF_SCOPE, CharterError
from charter.policy.engine import TIERS

SCOPE_KINDS = ("publish", "subscribe", "read")


def narrow_scopes(parent: dict[str, Any], requested: Any, child_name: str, child_id: str) -> dict[str, list[str]]:
    """The child's scopes: `requested` (default: the parent's own), each pattern checked against the parent's.

    `{name}` and `{id}` in a requested pattern are the child's name and id, as in role definitions.
    Refuses with `out_of_scope`, naming the first pattern that is not within the parent's.
    """
    mine = parent.get("scopes") or {}
    if requested is None:
        requested = {}
    if not isinstance(requested, dict) or not set(requested) <= set(SCOPE_KINDS):
        raise CharterError(BAD_REQUEST, "scopes is {\"publish\": [...], \"subscribe\": [...], \"read\": [...]}", "scopes")
    out: dict[str, list[str]] = {}
    for kind in SCOPE_KINDS:
        theirs = list(mine.get(kind) or [])
        asked = requested.get(kind, theirs)
        if not isinstance(asked, list) or not all(isinstance(p, str) for p in asked):
            raise CharterError(BAD_REQUEST, f"scopes.{kind} is a list of subject patterns", f"scopes.{kind}")
        patterns = []
        for p in asked:
            p = p.replace("{name}", child_name).replace("{id}", child_id)
            try:
                validate_pattern(p)
            except SubjectError as exc:
                raise CharterError(BAD_REQUEST, str(exc), f"scopes.{kind}") from None
            if not any(pattern_within(p, q) for q in theirs):
                raise CharterError(
                    OUT_OF_SCOPE, f"{kind} pattern {p!r} is not within the parent's {kind} scope "
                    f"({', '.join(theirs) or 'nothing'}); a sub-agent gets at most its parent's scopes",
                    f"scopes.{kind}")
            if p not in patterns:
                patterns.append(p)
        out[kind] = patterns
    return out


def narrow_tier(parent: dict[str, Any], requested: Any) -> str:
    top = parent.get("max_tier") or "T0"
    if requested is None:
        return top
    if requested not in TIERS:
        raise CharterError(BAD_REQUEST, f"max_tier is one of {', '.join(TIERS)}", "max_tier")
    if TIERS.index(requested) > TIERS.index(top):
        raise CharterError(OUT_OF_SCOPE, f"max_tier {requested} is above the parent's {top}; a sub-agent gets at "
                           "most its parent's tier", "max_tier")
    return str(requested)


def _cap(parent_value: Any, asked: Any, what: str) -> Any:
    if asked is None:
        return parent_value
    if isinstance(asked, bool) or not isinstance(asked, int | float) or asked < 0:
        raise CharterError(BAD_REQUEST, f"{what} is a non-negative number", what)
    if parent_value is not None and asked > parent_value:
        raise CharterError(OUT_OF_SCOPE, f"{what} {asked:g} is above the parent's {parent_value:g}", what)
    return asked


def narrow_budget(parent: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    b = parent.get("budget") or {}
    return {"usd_per_day": _cap(b.get("usd_per_day"), request.get("budget_usd_per_day"), "budget_usd_per_day"),
            "tokens_per_day": _cap(b.get("tokens_per_day"), request.get("budget_tokens_per_day"), "budget_tokens_per_day")}


def narrow_quota(parent: dict[str, Any], asked: Any) -> int:
    top = int((parent.get("sandbox") or {}).get("quota_bytes", 0))
    return int(_cap(top, asked, "sandbox_quota_bytes"))


def recut(child: dict[str, Any], parent: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A renewed (or re-keyed) child charter: the delegated limits kept, re-checked against the parent now.

    `body` is the fresh charter body derived from the role; the child's own, narrower fields replace
    it. A pattern no longer within the parent's scope (the parent was narrowed since) is dropped, and the
    tier, budget and quota are capped again; the expiry never passes the parent's.
    """
    theirs = parent.get("scopes") or {}
    scopes = {kind: [p for p in (child.get("scopes") or {}).get(kind, [])
                     if any(pattern_within(p, q) for q in theirs.get(kind) or [])] for kind in SCOPE_KINDS}
    tiers = [t for t in (child.get("max_tier"), parent.get("max_tier")) if t in TIERS] or ["T0"]
    pb, cb = parent.get("budget") or {}, child.get("budget") or {}
    budget = {k: (min(v for v in (pb.get(k), cb.get(k)) if v is not None)
                  if pb.get(k) is not None or cb.get(k) is not None else None)
              for k in ("usd_per_day", "tokens_per_day")}
    sandbox = dict(child.get("sandbox") or body["sandbox"])
    sandbox["quota_bytes"] = min(int(sandbox.get("quota_bytes", 0)), narrow_quota(parent, None))
    return {**body, "scopes": scopes, "max_tier": min(tiers, key=TIERS.index), "budget": budget,
            "sandbox": sandbox, "parent": child["parent"], "policy": parent.get("policy", body["policy"]),
            "expires_at": min(body["expires_at"], int(parent.get("expires_at", body["expires_at"]))),
            "renew_after": min(body["renew_after"], int(parent.get("expires_at", body["renew_after"])))}

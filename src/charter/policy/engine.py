"""Rule evaluation: which rule governs an action, at which risk tier, with which effect.

A policy is an ordered list of rules; the first rule whose action pattern matches and whose
condition holds decides (like a firewall, so the path to a decision is one line to explain).
No rule matching means deny: unknown actions fail closed.

Speed comes from selecting candidates before evaluating anything: the rules that can match an
action are computed once per action name and memoised, so 100 rules cost what the two or three
candidates cost. Conditions are CEL, compiled once (the Rust-backed `cel` package).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from charter.bus.subjects import matches
from charter.policy.cel_runtime import cel

TIERS = ("T0", "T1", "T2", "T3")
EFFECTS = ("allow", "deny", "approve")
ALLOW, DENY, APPROVE = "allow", "deny", "approve"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may this agent do this?", with the rule and the path that led to it."""

    effect: str  # allow | deny | approve
    rule: str | None
    tier: str | None
    reason: str
    path: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.effect == ALLOW

    def to_dict(self) -> dict[str, Any]:
        return {"effect": self.effect, "rule": self.rule, "tier": self.tier, "reason": self.reason,
                "path": list(self.path)}


@dataclass(frozen=True, slots=True)
class Subject:
    """Who is asking: what the conditions can see as `agent`, and the role's tier ceiling."""

    id: str
    name: str
    role: str
    max_tier: str

    def as_cel(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "role": self.role, "max_tier": self.max_tier}


@dataclass(slots=True)
class Rule:
    id: str
    actions: tuple[str, ...]
    effect: str
    tier: str
    reason: str
    when: str | None = None
    order: int = 0
    program: Any = field(default=None, repr=False)

    def matches_action(self, action: str) -> bool:
        return any(matches(p, action) for p in self.actions)


def _values(reads: tuple[str, ...], subject: Subject, action: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a condition reading `reads` can see: `action`, `agent`, and the request's attributes
    (which can never stand in for the two reserved names). A name with no value stays unset, and
    the condition fails to evaluate, as it would with every attribute given."""
    values: dict[str, Any] = {}
    for name in reads:
        if name == "action":
            values[name] = action
        elif name == "agent":
            values[name] = subject.as_cel()
        elif name in attrs:
            values[name] = attrs[name]
    return values


class PolicyEngine:
    def __init__(self, policy_id: str, version: int, policy_hash: str, rules: list[Rule]) -> None:
        self.policy_id, self.version, self.hash = policy_id, version, policy_hash
        self.rules = rules
        self._exact: dict[str, list[Rule]] = {}
        self._wild: list[Rule] = []
        for r in rules:
            if any("*" in p or ">" in p for p in r.actions):
                self._wild.append(r)
            for p in r.actions:
                if "*" not in p and ">" not in p:
                    self._exact.setdefault(p, []).append(r)
        self._memo: dict[str, tuple[Rule, ...]] = {}
        # The names each condition reads: its context holds only those. Converting a value into a
        # `cel.Context` is most of a condition's cost (8 attributes ~6.5 us, 2 ~1.3 us, executing
        # ~0.4 us), and a gateway call brings seven attributes to conditions that read one or two.
        self._reads: dict[int, tuple[str, ...]] = {
            r.order: tuple(sorted(set(r.program.variables()))) for r in rules if r.program is not None}
        # A condition over the action name alone (`action.matches("delete")`) is a constant for each
        # name: it is evaluated once per name and remembered, like the candidates.
        self._by_name = {r.order for r in rules if r.program is not None and _names_only_action(r.program)}
        self._held: dict[tuple[int, str], bool | str] = {}
        # A decision is a pure function of the action, the subject and the attributes its candidate
        # rules' conditions read (CEL has no clock and no I/O; these conditions call no Python). When
        # those are all strings, booleans or nulls (a gateway call's `provider` and `paid`, an MCP
        # tool's name), the decision is made once and remembered: a decision costs a dict lookup.
        # Numbers (amounts, token counts) differ from call to call, so a decision that reads one is
        # made every time rather than filling the memo. Values are keyed with their type, as CEL
        # tells `true` from `"true"`.
        self._names: dict[str, tuple[str, ...]] = {}  # per action: the attribute names its candidates read
        self._decided: dict[tuple[Any, ...], Decision] = {}

    def candidates(self, action: str) -> tuple[Rule, ...]:
        hit = self._memo.get(action)
        if hit is None:
            found = {id(r): r for r in self._exact.get(action, ())}
            for r in self._wild:
                if r.matches_action(action):
                    found[id(r)] = r
            hit = tuple(sorted(found.values(), key=lambda r: r.order))
            if len(self._memo) > 10_000:
                self._memo.clear()
                self._names.clear()
            self._memo[action] = hit
            self._names[action] = tuple(sorted({n for r in hit if r.program is not None for n in self._reads[r.order]}
                                               - {"action", "agent"}))
        return hit

    def decide(self, subject: Subject, action: str, attrs: Mapping[str, Any] | None = None,
               *, explain: bool = False) -> Decision:
        attrs = attrs or {}
        if not explain:
            key = self._decision_key(subject, action, attrs)
            if key is not None:
                hit = self._decided.get(key)
                if hit is None:
                    hit = self._decide(subject, action, attrs, False)
                    if len(self._decided) >= MEMO_SIZE:
                        self._decided.clear()
                    self._decided[key] = hit
                return hit
        return self._decide(subject, action, attrs, explain)

    def _decision_key(self, subject: Subject, action: str, attrs: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """What a decision depends on, as a dict key (see __init__); None when it reads a number,
        a list or a map."""
        names = self._names.get(action)
        if names is None:
            self.candidates(action)
            names = self._names[action]
        key: list[Any] = [action, subject.id, subject.name, subject.role, subject.max_tier]
        for name in names:
            v = attrs.get(name, _UNSET)
            t = type(v)
            if v is not _UNSET and t not in _PLAIN:
                return None
            key.append((t, v))
        return tuple(key)

    def _decide(self, subject: Subject, action: str, attrs: Mapping[str, Any], explain: bool) -> Decision:
        path: list[str] = []
        contexts: dict[tuple[str, ...], Any] = {}  # one per set of names read, shared by the rules reading it
        for rule in self.candidates(action):
            if rule.program is not None:
                try:
                    if rule.order in self._by_name:
                        held = self._held_for_name(rule, action)
                    else:
                        reads = self._reads[rule.order]
                        ctx = contexts.get(reads)
                        if ctx is None:
                            ctx = contexts[reads] = cel.Context(_values(reads, subject, action, attrs))
                        held = rule.program.execute(ctx) is True
                except Exception as exc:  # noqa: BLE001 - a condition that cannot be evaluated
                    # Fail closed: a deny rule that cannot be evaluated denies, an approve rule asks
                    # for the approval; only an allow rule is skipped.
                    if rule.effect == DENY:
                        return Decision(DENY, rule.id, rule.tier,
                                        f"rule {rule.id!r} could not be evaluated ({_short(exc)}); denying",
                                        tuple(path + [f"{rule.id}: condition error, deny rule: deny"]))
                    if rule.effect == APPROVE:
                        path.append(f"{rule.id}: condition error ({_short(exc)}), approve rule: applies")
                        return self._apply(subject, rule, path)
                    if explain:
                        path.append(f"{rule.id}: condition error ({_short(exc)}), skipped")
                    continue
                if not held:
                    if explain:
                        path.append(f"{rule.id}: action matches, condition `{rule.when}` is false")
                    continue
            if explain:
                path.append(f"{rule.id}: matches" + (f" (`{rule.when}` holds)" if rule.when else ""))
            return self._apply(subject, rule, path)
        path.append(f"no rule of policy {self.policy_id} v{self.version} matches action {action!r}")
        return Decision(DENY, None, None, f"no rule allows {action!r}: unknown actions are denied", tuple(path))

    def _held_for_name(self, rule: Rule, action: str) -> bool:
        key = (rule.order, action)
        hit = self._held.get(key)
        if hit is None:
            try:
                hit = rule.program.execute(cel.Context({"action": action})) is True
            except Exception as exc:  # noqa: BLE001 - remembered, and raised afresh each time, as if evaluated
                hit = str(exc)
            if len(self._held) > 10_000:
                self._held.clear()
            self._held[key] = hit
        if isinstance(hit, str):
            raise RuntimeError(hit)
        return hit

    def _apply(self, subject: Subject, rule: Rule, path: list[str]) -> Decision:
        if rule.effect == DENY:
            return Decision(DENY, rule.id, rule.tier, rule.reason or f"denied by rule {rule.id!r}", tuple(path))
        if subject.max_tier not in TIERS:  # fail closed on a ceiling that is not a tier, do not crash
            path.append(f"role {subject.role}'s maximum tier {subject.max_tier!r} is not one of {', '.join(TIERS)}")
            return Decision(DENY, rule.id, rule.tier, f"max_tier {subject.max_tier!r} is not one of "
                            f"{', '.join(TIERS)}; denying", tuple(path))
        if TIERS.index(rule.tier) > TIERS.index(subject.max_tier):
            path.append(f"tier {rule.tier} is above role {subject.role}'s maximum {subject.max_tier}")
            return Decision(DENY, rule.id, rule.tier,
                            f"{rule.tier} action, but role {subject.role!r} may act up to {subject.max_tier}", tuple(path))
        if rule.effect == APPROVE or rule.tier == "T3":
            path.append("waits for an operator's approval" + (" (T3)" if rule.tier == "T3" else ""))
            return Decision(APPROVE, rule.id, rule.tier, rule.reason or f"rule {rule.id!r} requires approval", tuple(path))
        return Decision(ALLOW, rule.id, rule.tier, rule.reason or f"allowed by rule {rule.id!r}", tuple(path))


MEMO_SIZE = 20_000  # remembered decisions; emptied when full
_PLAIN = (str, bool, type(None))
_UNSET = object()


def _names_only_action(program: Any) -> bool:
    try:
        return set(program.variables()) == {"action"}
    except Exception:  # noqa: BLE001 - unknown: evaluate it every time
        return False


def _short(exc: Exception) -> str:
    text = str(exc).split("ERROR:")[0].strip()
    return text[:160]


# The functions the conditions' CEL (the `cel` package's interpreter, without Python extensions) has:
# a name outside this set compiles and only fails when evaluated, so lint refuses it. Operators
# (`_&&_`, `@in`, ...) and macros (`has`, `all`, `exists`, `exists_one`, `map`, `filter`) are not
# functions here. tests/test_policy.py evaluates every one of them, so the list cannot drift.
CEL_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches",
    "int", "uint", "double", "string", "bytes", "type", "dyn", "timestamp", "duration",
    "getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfYear", "getDayOfWeek",
    "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    "of", "ofNonZeroValue", "none", "hasValue", "value", "or", "orValue",
})


def unknown_functions(program: Any) -> list[str]:
    """Function names a compiled condition calls that the CEL interpreter does not have."""
    try:
        names = program.functions()
    except Exception:  # noqa: BLE001 - a binding without introspection: nothing to check
        return []
    return sorted({n for n in names if n.isidentifier() and not n.startswith("_") and n not in CEL_FUNCTIONS})


def compile_condition(expr: str) -> Any:
    """Compile a CEL expression; raises ValueError with the parser's message."""
    try:
        return cel.compile(expr)
    except Exception as exc:  # noqa: BLE001 - the binding raises ValueError, be sure
        raise ValueError(str(exc)) from None

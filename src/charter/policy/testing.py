"""Policy unit tests kept in files (`policies/tests/*.toml`), the way `opa test` works.

A case gives a role (for its max_tier), an action with attributes, the expected effect and,
optionally, the rule that must decide. Runs offline against the policy files, no daemon needed.
A key a case does not know is an error, not ignored: a misspelt `expect` or `attrs` would
otherwise test something else than it says. Errors name the file and line.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.config import Config
from charter.errors import ConfigError
from charter.policy.engine import EFFECTS, TIERS, Subject
from charter.policy.store import Policy, _Lines, load_policy


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    ok: bool
    expected: str
    got: str
    rule: str | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "name": self.name, "ok": self.ok, "expected": self.expected, "got": self.got,
                "rule": self.rule, "detail": self.detail}


CASE_KEYS = {"name", "role", "max_tier", "agent", "action", "attrs", "expect", "rule"}
TOP_KEYS = {"policy", "case"}


def run_file(path: Path, policies_dir: Path, config: Config) -> list[CaseResult]:
    """Run every case of one test file; a malformed file or case raises ConfigError at `file:line`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy tests: {exc}", str(path)) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"not valid TOML: {exc}", f"{path}:{m.group(1) if m else 1}") from None
    lines = _Lines(text, "case")
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown key {key!r}; a policy test file has `policy` and [[case]] tables",
                              f"{path}:{lines.top(key)}")
    pid = doc.get("policy")
    if not isinstance(pid, str):
        raise ConfigError("a policy test file names its `policy` (an id)", f"{path}:{lines.top('policy')}")
    policy: Policy = load_policy(policies_dir / f"{pid}.toml")
    cases = doc.get("case", [])
    if not isinstance(cases, list) or not cases:
        raise ConfigError("a policy test file has one or more [[case]] tables", f"{path}:{lines.top('case')}")
    results = []
    for i, case in enumerate(cases):
        if not isinstance(case, dict):
            raise ConfigError(f"case[{i}] is not a table", f"{path}:{lines.rule(i)}: case[{i}]")
        name = str(case.get("name", f"case {i + 1}"))

        def where(key: str | None = None, i: int = i) -> str:
            return f"{path}:{lines.rule(i, key)}: case[{i}]"

        for key in case:
            if key not in CASE_KEYS:
                raise ConfigError(f"case {name!r}: unknown key {key!r}; a case has {', '.join(sorted(CASE_KEYS))}",
                                  where(key))
        role_name = case.get("role")
        max_tier = case.get("max_tier")
        if max_tier is None:
            role = config.roles.get(str(role_name))
            if role is None:
                raise ConfigError(f"case {name!r}: role {role_name!r} is not in charter.toml; give `max_tier`",
                                  where("role" if "role" in case else None))
            max_tier = role.max_tier
        elif max_tier not in TIERS:
            raise ConfigError(f"case {name!r}: max_tier {max_tier!r} is not one of {', '.join(TIERS)}",
                              where("max_tier"))
        expect = case.get("expect")
        if not isinstance(case.get("action"), str):
            raise ConfigError(f"case {name!r} needs `action` and `expect` (allow, deny or approve): "
                              f"`action` is {'missing' if 'action' not in case else repr(case['action'])}",
                              where("action" if "action" in case else None))
        if expect not in EFFECTS:
            raise ConfigError(f"case {name!r} needs `action` and `expect` (allow, deny or approve): "
                              f"`expect` is {'missing' if 'expect' not in case else repr(expect)}",
                              where("expect" if "expect" in case else None))
        attrs = case.get("attrs", {})
        if not isinstance(attrs, dict):
            raise ConfigError(f"case {name!r}: `attrs` must be a table, e.g. attrs = {{ amount_usd = 1 }}",
                              where("attrs"))
        rule = case.get("rule")
        if rule is not None and not isinstance(rule, str):
            raise ConfigError(f"case {name!r}: `rule` must be a rule id (a string)", where("rule"))
        subject = Subject("agt_test", str(case.get("agent", "test-agent")), str(role_name or "test"), str(max_tier))
        d = policy.engine.decide(subject, case["action"], attrs, explain=True)
        ok = d.effect == expect and (rule is None or rule == d.rule)
        detail = d.reason if ok else f"expected {expect}" + (f" by rule {rule!r}" if rule else "") + \
            f", got {d.effect} by rule {d.rule!r}: {'; '.join(d.path)}"
        results.append(CaseResult(str(path), name, ok, str(expect), d.effect, d.rule, detail))
    return results

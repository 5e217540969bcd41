"""Policy unit tests kept in files (`policies/tests/*.toml`), the way `opa test` works.

A case gives a role (for its max_tier), an action with attributes, the expected effect and,
optionally, the rule that must decide. Runs offline against the policy files, no daemon needed.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.config import Config
from charter.errors import ConfigError
from charter.policy.engine import EFFECTS, Subject
from charter.policy.store import Policy, load_policy


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


def run_file(path: Path, policies_dir: Path, config: Config) -> list[CaseResult]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", str(path)) from None
    pid = doc.get("policy")
    if not isinstance(pid, str):
        raise ConfigError("a policy test file names its `policy` (an id)", f"{path}: policy")
    policy: Policy = load_policy(policies_dir / f"{pid}.toml")
    cases = doc.get("case", [])
    if not isinstance(cases, list) or not cases:
        raise ConfigError("a policy test file has one or more [[case]] tables", f"{path}: case")
    results = []
    for i, case in enumerate(cases):
        name = str(case.get("name", f"case {i + 1}"))
        where = f"{path}: case[{i}]"
        role_name = case.get("role")
        max_tier = case.get("max_tier")
        if max_tier is None:
            role = config.roles.get(str(role_name))
            if role is None:
                raise ConfigError(f"case {name!r}: role {role_name!r} is not in charter.toml; give `max_tier`", where)
            max_tier = role.max_tier
        expect = case.get("expect")
        if expect not in EFFECTS or not isinstance(case.get("action"), str):
            raise ConfigError(f"case {name!r} needs `action` and `expect` (allow, deny or approve)", where)
        attrs = case.get("attrs", {})
        subject = Subject("agt_test", str(case.get("agent", "test-agent")), str(role_name or "test"), str(max_tier))
        d = policy.engine.decide(subject, case["action"], attrs, explain=True)
        ok = d.effect == expect and (case.get("rule") is None or case["rule"] == d.rule)
        detail = d.reason if ok else f"expected {expect}" + (f" by rule {case['rule']!r}" if case.get("rule") else "") + \
            f", got {d.effect} by rule {d.rule!r}: {'; '.join(d.path)}"
        results.append(CaseResult(str(path), name, ok, str(expect), d.effect, d.rule, detail))
    return results

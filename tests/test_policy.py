"""Policies: lint with file:line, rule semantics, `charter policy test`, binding by hash, decisions on the bus.

The lint, engine and `policy test` parts run offline; the binding and bus parts go through a real
daemon (`python -m charter up`) and the real `charter` command, as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import cel
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from charter.bus.subjects import matches
from charter.config import Home
from charter.encoding import canonical, sha256_hex
from charter.errors import CharterError
from charter.policy.engine import TIERS, Decision, PolicyEngine, Rule, Subject
from charter.policy.store import check_document, lint_text, load_policy
from charter.sdk import Agent
from charter.server.daemon import stop
from tests.conftest import Daemon, make_home, start_daemon

DEFAULTS = Path(__file__).resolve().parent.parent / "src" / "charter" / "defaults" / "policies"
MARK = "# <-"  # lint cases mark the line the problem must be reported on


def charter(home: Path | Home, *args: str) -> subprocess.CompletedProcess[str]:
    root = home.root if isinstance(home, Home) else home
    env = {**os.environ, "CHARTER_HOME": str(root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def marked_line(text: str) -> int:
    lines = [i + 1 for i, ln in enumerate(text.splitlines()) if MARK in ln]
    assert len(lines) == 1, "a lint case marks exactly one line"
    return lines[0]


# -- lint: every kind of malformed policy, with the right file and line ------------------------

HEAD = 'id = "p"\nversion = 1\ndescription = "lint cases"\n'
OK_RULE = '\n[[rules]]\nid = "ok"\naction = "fs.read"\neffect = "allow"\ntier = "T1"\n'

# (case id, text of p.toml, a fragment of the message, severity). MARK is on the expected line.
LINT_CASES: list[tuple[str, str, str, str]] = [
    ("toml-syntax", HEAD + OK_RULE + '\n[[rules]]\nid = "broken"\naction = "fs.write"\ntier =  ' + MARK + "\n",
     "not valid TOML", "error"),
    ("toml-duplicate-key", HEAD + '\n[[rules]]\nid = "a"\nid = "b"  ' + MARK + "\n", "not valid TOML", "error"),
    ("unknown-top-key", HEAD + 'owner = "me"  ' + MARK + "\n" + OK_RULE, "unknown key 'owner'", "error"),
    ("unknown-top-table", HEAD + OK_RULE + "\n[metadata]  " + MARK + '\nteam = "infra"\n',
     "unknown key 'metadata'", "error"),
    ("missing-id", 'version = 1  ' + MARK + "\n" + OK_RULE, "a policy needs an `id`", "error"),
    ("bad-id", '# a comment first\nversion = 1\nid = "Not An Id"  ' + MARK + "\n" + OK_RULE,
     "a policy needs an `id`", "error"),
    ("non-string-id", 'version = 1\nid = 7  ' + MARK + "\n", "a policy needs an `id`", "error"),
    ("id-not-file-name", '# the file is p.toml\nid = "other"  ' + MARK + '\nversion = 1\n' + OK_RULE,
     "must match its file name 'p'", "error"),
    # A missing key has no line of its own: it is reported on line 1.
    ("missing-version", 'id = "p"  ' + MARK + "\n" + OK_RULE, "integer `version`", "error"),
    ("version-zero", 'id = "p"\n\nversion = 0  ' + MARK + "\n" + OK_RULE, "integer `version`", "error"),
    ("version-string", 'id = "p"\nversion = "2"  ' + MARK + "\n" + OK_RULE, "integer `version`", "error"),
    ("version-bool", 'id = "p"\nversion = true  ' + MARK + "\n" + OK_RULE, "integer `version`", "error"),
    ("rules-not-array", HEAD.replace('description = "lint cases"\n', 'rules = "none"  ' + MARK + "\n"),
     "`rules` must be an array", "error"),
    ("rule-without-id", HEAD + OK_RULE + "\n[[rules]]  " + MARK + '\naction = "fs.write"\neffect = "allow"\ntier = "T1"\n',
     "every rule needs a string `id`", "error"),
    ("rule-id-not-string", HEAD + '\n[[rules]]\nid = 42  ' + MARK + '\naction = "fs.write"\neffect = "allow"\ntier = "T1"\n',
     "every rule needs a string `id`", "error"),
    ("duplicate-rule-id", HEAD + OK_RULE + '\n[[rules]]\nid = "ok"  ' + MARK + '\naction = "fs.write"\neffect = "allow"\ntier = "T1"\n',
     "rule id 'ok' is used twice (first at line 6)", "error"),
    ("typo-efect", HEAD + OK_RULE + '\n[[rules]]\nid = "w"\naction = "fs.write"\nefect = "deny"  ' + MARK + '\ntier = "T1"\n',
     "unknown key 'efect' in a rule", "error"),
    ("action-and-actions", HEAD + '\n[[rules]]\nid = "w"\naction = "fs.write"\nactions = ["fs.read"]  ' + MARK
     + '\neffect = "allow"\ntier = "T1"\n', "give `action` or `actions`, not both", "error"),
    ("missing-action", HEAD + OK_RULE + '\n[[rules]]  ' + MARK + '\nid = "w"\neffect = "allow"\ntier = "T1"\n',
     "rule 'w' needs `action`", "error"),
    ("empty-actions", HEAD + '\n[[rules]]\nid = "w"\nactions = []  ' + MARK + '\neffect = "allow"\ntier = "T1"\n',
     "rule 'w' needs `action`", "error"),
    ("action-not-string", HEAD + '\n[[rules]]\nid = "w"\naction = 3  ' + MARK + '\neffect = "allow"\ntier = "T1"\n',
     "rule 'w' needs `action`", "error"),
    ("bad-action-pattern", HEAD + OK_RULE + '\n[[rules]]\nid = "w"\naction = "a.>.b"  ' + MARK
     + '\neffect = "allow"\ntier = "T1"\n', "bad action pattern", "error"),
    ("bad-pattern-in-actions", HEAD + '\n[[rules]]\nid = "w"\nactions = ["fs.read", "fs..write"]  ' + MARK
     + '\neffect = "allow"\ntier = "T1"\n', "bad action pattern", "error"),
    ("bad-effect", HEAD + '\n[[rules]]\nid = "w"\naction = "fs.write"\neffect = "permit"  ' + MARK + '\ntier = "T1"\n',
     "`effect` must be one of allow, deny, approve", "error"),
    ("missing-effect", HEAD + OK_RULE + '\n[[rules]]  ' + MARK + '\nid = "w"\naction = "fs.write"\ntier = "T1"\n',
     "`effect` must be one of", "error"),
    ("bad-tier", HEAD + '\n[[rules]]\nid = "w"\naction = "fs.write"\neffect = "allow"\ntier = "T4"  ' + MARK + "\n",
     "`tier` must be one of T0, T1, T2, T3", "error"),
    ("tier-lowercase", HEAD + '\n[[rules]]\nid = "w"\naction = "fs.write"\neffect = "allow"\ntier = "t1"  ' + MARK + "\n",
     "`tier` must be one of", "error"),
    ("missing-tier", HEAD + '\n[[rules]]  ' + MARK + '\nid = "w"\naction = "fs.write"\neffect = "allow"\n',
     "`tier` must be one of", "error"),
    ("when-does-not-compile", HEAD + OK_RULE + '\n[[rules]]\nid = "w"\naction = "spend.>"\nwhen = "amount_usd >"  ' + MARK
     + '\neffect = "approve"\ntier = "T3"\n', "condition does not compile", "error"),
    ("when-not-string", HEAD + '\n[[rules]]\nid = "w"\naction = "spend.>"\nwhen = true  ' + MARK
     + '\neffect = "approve"\ntier = "T3"\n', "`when` must be a CEL expression", "error"),
    ("reason-not-string", HEAD + '\n[[rules]]\nid = "w"\naction = "fs.write"\neffect = "allow"\ntier = "T1"\nreason = 5  '
     + MARK + "\n", "`reason` must be a string", "error"),
    ("cel-function-typo", HEAD + OK_RULE + '\n[[rules]]\nid = "net"\naction = "net.http"\nwhen = \'host.endswith(".internal")\'  '
     + MARK + '\neffect = "allow"\ntier = "T2"\n', "calls endswith(), which CEL does not have (did you mean endsWith()?)",
     "error"),
    ("cel-unknown-function", HEAD + '\n[[rules]]\nid = "big"\naction = "spend.>"\neffect = "approve"\ntier = "T3"\n'
     'when = "max(amount_usd, 1) > 5"  ' + MARK + "\n", "calls max(), which CEL does not have", "error"),
    ("inline-rules-second", HEAD + 'rules = [\n  { id = "a", action = "fs.read", effect = "allow", tier = "T0", reason = "{ [" },\n'
     '  { id = "b", action = "fs.write", effect = "alow", tier = "T1" },  ' + MARK + '\n]\n',
     "rule 'b': `effect` must be one of", "error"),
    ("inline-rules-third-when", HEAD + 'rules = [ { id = "a", action = "fs.read", effect = "allow", tier = "T0" },\n'
     '  { id = "b", action = "fs.write", effect = "allow", tier = "T1" },  # } a brace in a comment\n'
     '  { id = "c", action = "net.http", effect = "allow", tier = "T2", when = \'host.startswith("x")\' } ]  ' + MARK + "\n",
     "rule 'c': condition calls startswith()", "error"),
    ("shadowed-rule", HEAD + OK_RULE + '\n[[rules]]  ' + MARK + '\nid = "never"\naction = "fs.read"\nwhen = "true"\n'
     'effect = "deny"\ntier = "T0"\n', "rule 'never' can never match 'fs.read': rule 'ok' above it", "warning"),
    ("shadowed-by-wildcard", HEAD + '\n[[rules]]\nid = "all-net"\naction = "net.>"\neffect = "deny"\ntier = "T2"\n'
     '\n[[rules]]  ' + MARK + '\nid = "internal"\naction = "net.http"\neffect = "allow"\ntier = "T2"\n',
     "rule 'internal' can never match 'net.http': rule 'all-net' above it", "warning"),
]


@pytest.mark.parametrize(("text", "fragment", "severity"), [c[1:] for c in LINT_CASES], ids=[c[0] for c in LINT_CASES])
def test_lint_names_file_and_line(text: str, fragment: str, severity: str) -> None:
    problems, _data, _rules = lint_text(text, "policies/p.toml", "p")
    hits = [p for p in problems if fragment in p.message]
    assert hits, f"no problem mentions {fragment!r}: {[str(p) for p in problems]}"
    p = hits[0]
    assert (p.file, p.line, p.severity) == ("policies/p.toml", marked_line(text), severity), str(p)
    assert str(p).startswith(f"policies/p.toml:{marked_line(text)}: {severity}: ")


def test_lint_problems_are_not_duplicated_or_spurious() -> None:
    # A file with exactly one mistake gets exactly one problem (no cascades from the typo).
    text = HEAD + OK_RULE + '\n[[rules]]\nid = "w"\naction = "fs.write"\nefect = "deny"\neffect = "deny"\ntier = "T1"\n'
    problems, _, rules = lint_text(text, "p.toml", "p")
    assert [(p.line, p.severity) for p in problems] == [(14, "error")]
    assert [r.id for r in rules] == ["ok", "w"]


def test_lint_conditional_rules_above_do_not_shadow() -> None:
    text = HEAD + ('\n[[rules]]\nid = "big"\naction = "spend.>"\nwhen = "amount_usd > 5"\neffect = "approve"\ntier = "T3"\n'
                   '\n[[rules]]\nid = "small"\naction = "spend.>"\neffect = "allow"\ntier = "T2"\n'
                   '\n[[rules]]\nid = "other-net"\naction = "net.http"\neffect = "allow"\ntier = "T2"\n')
    assert lint_text(text, "p.toml", "p")[0] == []


def test_default_policies_lint_clean() -> None:
    for f in sorted(DEFAULTS.glob("*.toml")):
        problems, data, rules = lint_text(f.read_text(), str(f), f.stem)
        assert problems == [], [str(p) for p in problems]
        assert data is not None and len(rules) == len(data["rules"])


def test_cli_lint_json_reports_every_case_with_file_and_line(tmp_path: Path) -> None:
    files: dict[Path, tuple[int, str, str]] = {}
    for name, text, fragment, severity in LINT_CASES:
        d = tmp_path / name
        d.mkdir()
        (d / "p.toml").write_text(text)
        files[d / "p.toml"] = (marked_line(text), fragment, severity)
    proc = charter(tmp_path / "nohome", "policy", "lint", *map(str, files), "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["files"] == [str(f) for f in files]
    for f, (line, fragment, severity) in files.items():
        mine = [p for p in report["problems"] if p["file"] == str(f) and fragment in p["message"]]
        assert mine, f"{f.parent.name}: {fragment!r} not in {[p for p in report['problems'] if p['file'] == str(f)]}"
        assert (mine[0]["line"], mine[0]["severity"]) == (line, severity), (f.parent.name, mine[0])
        assert mine[0]["text"].startswith(f"{f}:{line}: {severity}: ")


def test_cli_lint_exit_codes(tmp_path: Path) -> None:
    clean = tmp_path / "default.toml"
    shutil.copy(DEFAULTS / "default.toml", clean)
    proc = charter(tmp_path / "nohome", "policy", "lint", str(clean), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["problems"] == []

    # Warnings only: exit 0, the warning still reported with its line.
    text = next(c[1] for c in LINT_CASES if c[0] == "shadowed-rule")
    warn = tmp_path / "w" / "p.toml"
    warn.parent.mkdir()
    warn.write_text(text)
    proc = charter(tmp_path / "nohome", "policy", "lint", str(warn), "--json")
    assert proc.returncode == 0, proc.stderr
    (problem,) = json.loads(proc.stdout)["problems"]
    assert (problem["severity"], problem["line"]) == ("warning", marked_line(text))

    # Text output: file:line: severity: message, exit 1 on an error.
    bad = tmp_path / "b" / "p.toml"
    bad.parent.mkdir()
    bad.write_text(next(c[1] for c in LINT_CASES if c[0] == "typo-efect"))
    proc = charter(tmp_path / "nohome", "policy", "lint", str(bad), str(warn))
    assert proc.returncode == 1
    assert f"{bad}:{marked_line(bad.read_text())}: error: unknown key 'efect'" in proc.stdout
    assert f"{warn}:{marked_line(text)}: warning:" in proc.stdout


def test_load_refuses_a_policy_with_an_error(tmp_path: Path) -> None:
    from charter.errors import ConfigError

    bad = tmp_path / "p.toml"
    bad.write_text(next(c[1] for c in LINT_CASES if c[0] == "bad-tier"))
    with pytest.raises(ConfigError) as exc:
        load_policy(bad)
    assert exc.value.where == f"{bad}:{marked_line(bad.read_text())}"


# -- engine semantics ----------------------------------------------------------------------------

WORKER = Subject("agt_w", "wendy", "worker", "T2")
OBSERVER = Subject("agt_o", "owl", "observer", "T0")
COORD = Subject("agt_c", "cora", "coordinator", "T3")


def engine(*rules: dict[str, Any]) -> PolicyEngine:
    doc = {"id": "t", "version": 1, "rules": list(rules)}
    problems, compiled = check_document(doc, "t.toml")
    errors = [p for p in problems if p.severity == "error"]
    assert not errors, [str(p) for p in errors]
    return PolicyEngine("t", 1, sha256_hex(canonical(doc)), compiled)


def r(rid: str, action: str | list[str], effect: str = "allow", tier: str = "T0", when: str | None = None,
      reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "effect": effect, "tier": tier}
    out["actions" if isinstance(action, list) else "action"] = action
    if when is not None:
        out["when"] = when
    if reason is not None:
        out["reason"] = reason
    return out


def test_first_matching_rule_wins_in_file_order() -> None:
    e = engine(r("first", "fs.write"), r("second", "fs.write", "deny"))
    assert (e.decide(WORKER, "fs.write").effect, e.decide(WORKER, "fs.write").rule) == ("allow", "first")
    e = engine(r("second", "fs.write", "deny"), r("first", "fs.write"))
    assert (e.decide(WORKER, "fs.write").effect, e.decide(WORKER, "fs.write").rule) == ("deny", "second")
    # A wildcard rule above an exact one wins too: order, not specificity, decides.
    e = engine(r("all-fs", "fs.>", "deny"), r("write", "fs.write"))
    assert e.decide(WORKER, "fs.write").rule == "all-fs"
    e = engine(r("write", "fs.write"), r("all-fs", "fs.>", "deny"))
    assert e.decide(WORKER, "fs.write").rule == "write" and e.decide(WORKER, "fs.read").rule == "all-fs"
    # A rule whose condition is false is passed over; the next one decides.
    e = engine(r("big", "spend.buy", "deny", when="amount_usd > 5"), r("small", "spend.buy", tier="T2"))
    assert e.decide(WORKER, "spend.buy", {"amount_usd": 9}).rule == "big"
    d = e.decide(WORKER, "spend.buy", {"amount_usd": 1}, explain=True)
    assert (d.effect, d.rule) == ("allow", "small")
    assert d.path == ("big: action matches, condition `amount_usd > 5` is false", "small: matches")


def test_unknown_actions_are_denied() -> None:
    e = engine(r("read", "fs.read"), r("net", "net.>", tier="T2"))
    for action in ("teleport.now", "fs.write", "fs", "net", "fs.read.more"):
        d = e.decide(COORD, action, explain=True)
        assert (d.effect, d.rule, d.tier) == ("deny", None, None), action
        assert "unknown actions are denied" in d.reason
        assert d.path[-1] == f"no rule of policy t v1 matches action {action!r}"
    assert engine().decide(COORD, "fs.read").effect == "deny"


def test_tier_above_the_roles_max_tier_is_denied() -> None:
    e = engine(r("paid", "model.call", tier="T2"))
    d = e.decide(OBSERVER, "model.call", explain=True)
    assert (d.effect, d.rule, d.tier) == ("deny", "paid", "T2")
    assert "role 'observer' may act up to T0" in d.reason
    assert "tier T2 is above role observer's maximum T0" in d.path
    assert e.decide(WORKER, "model.call").effect == "allow"
    assert e.decide(COORD, "model.call").effect == "allow"
    # Exactly at the ceiling is allowed.
    for i, tier in enumerate(TIERS[:3]):
        s = Subject("agt", "a", "r", tier)
        assert [engine(r("x", "a.b", tier=t)).decide(s, "a.b").effect for t in TIERS[:3]] == \
            ["allow"] * (i + 1) + ["deny"] * (2 - i)


def test_t3_always_asks_for_approval() -> None:
    e = engine(r("shell", "shell.exec", "allow", "T3", reason="irreversible"))
    d = e.decide(COORD, "shell.exec", explain=True)
    assert (d.effect, d.rule, d.tier, d.reason) == ("approve", "shell", "T3", "irreversible")
    assert d.path[-1] == "waits for an operator's approval (T3)"
    assert not d.allowed
    # A role below T3 is denied outright rather than queued for an approval.
    assert e.decide(WORKER, "shell.exec").effect == "deny"


def test_approve_effect_at_a_low_tier_asks_for_approval() -> None:
    e = engine(r("careful-write", "fs.write", "approve", "T1"))
    d = e.decide(WORKER, "fs.write")
    assert (d.effect, d.rule, d.tier) == ("approve", "careful-write", "T1")
    assert "requires approval" in d.reason
    # The tier ceiling still applies first.
    assert e.decide(OBSERVER, "fs.write").effect == "deny"


def test_deny_rules_deny_whatever_the_tier() -> None:
    e = engine(r("no-prod", "deploy.prod", "deny", "T0", reason="never from an agent"), r("deploy", "deploy.>", tier="T1"))
    for s in (OBSERVER, WORKER, COORD):
        d = e.decide(s, "deploy.prod")
        assert (d.effect, d.rule, d.reason) == ("deny", "no-prod", "never from an agent")
    assert e.decide(WORKER, "deploy.staging").effect == "allow"
    assert engine(r("x", "a.b", "deny", "T3")).decide(OBSERVER, "a.b").reason == "denied by rule 'x'"


def test_a_condition_that_cannot_be_evaluated_fails_closed_for_deny_and_is_skipped_for_allow() -> None:
    # The deny rule's attribute is missing: deny, even though an allow rule follows.
    e = engine(r("cap", "spend.buy", "deny", when="amount_usd > 5"), r("spend", "spend.buy", tier="T2"))
    d = e.decide(WORKER, "spend.buy", {}, explain=True)
    assert (d.effect, d.rule) == ("deny", "cap")
    assert "could not be evaluated" in d.reason and "amount_usd" in d.reason
    assert d.path == ("cap: condition error, deny rule: deny",)
    # A wrong type is the same kind of failure.
    assert e.decide(WORKER, "spend.buy", {"amount_usd": "lots"}).rule == "cap"
    assert e.decide(WORKER, "spend.buy", {"amount_usd": 1}).rule == "spend"

    # The allow rule's attribute is missing: skipped, and the next rule (or the default deny) decides.
    e = engine(r("internal", "net.http", when='host.endsWith(".internal")', tier="T2"), r("ask", "net.http", "approve", "T2"))
    d = e.decide(WORKER, "net.http", {}, explain=True)
    assert (d.effect, d.rule) == ("approve", "ask")
    assert d.path[0].startswith("internal: condition error (") and d.path[0].endswith("), skipped")
    assert e.decide(WORKER, "net.http", {"host": "db.internal"}).rule == "internal"
    alone = engine(r("internal", "net.http", when='host.endsWith(".internal")', tier="T2"))
    assert (alone.decide(WORKER, "net.http", {}).effect, alone.decide(WORKER, "net.http", {}).rule) == ("deny", None)
    # An approve rule whose condition breaks fails closed too: the approval is asked for.
    e = engine(r("ask", "spend.buy", "approve", "T3", when="amount_usd > 5"))
    assert (e.decide(COORD, "spend.buy", {}).effect, e.decide(COORD, "spend.buy", {}).rule) == ("approve", "ask")


def test_an_approve_rule_that_cannot_be_evaluated_does_not_fall_through_to_an_allow() -> None:
    policy = load_policy(DEFAULTS / "default.toml")
    # `large-spend` (approve, T3, when amount_usd > 5) then `spend` (allow, T2): no amount given.
    d = policy.engine.decide(COORD, "spend.purchase", {})
    assert d.effect != "allow", d


def test_a_condition_that_is_not_a_boolean_does_not_hold() -> None:
    e = engine(r("odd", "a.b", when="1"), r("fallback", "a.b", "deny"))
    assert e.decide(WORKER, "a.b").rule == "fallback"


def test_reserved_names_agent_and_action_are_visible_to_conditions() -> None:
    e = engine(r("workers", "tasks.claim", when='agent.role == "worker"', tier="T1"),
               r("by-name", "tasks.claim", when='agent.name == "cora" && agent.id == "agt_c" && agent.max_tier == "T3"'),
               r("others", "tasks.claim", "deny"))
    assert e.decide(WORKER, "tasks.claim").rule == "workers"
    assert e.decide(COORD, "tasks.claim").rule == "by-name"
    assert e.decide(OBSERVER, "tasks.claim").rule == "others"
    # Attributes cannot impersonate the subject or rename the action.
    spoof = {"agent": {"role": "worker", "name": "cora", "id": "agt_c", "max_tier": "T3"}, "action": "other"}
    assert e.decide(OBSERVER, "tasks.claim", spoof).rule == "others"
    e = engine(r("read", "fs.>", when='action == "fs.read"'), r("rest", "fs.>", "deny"))
    assert e.decide(WORKER, "fs.read", {"action": "fs.write"}).rule == "read"
    assert e.decide(WORKER, "fs.write", {"action": "fs.read"}).rule == "rest"


def test_wildcard_action_patterns() -> None:
    e = engine(r("net", "net.>", tier="T2"), r("spend", "spend.*", tier="T2"), r("mid", "a.*.c"))
    assert e.decide(WORKER, "net.http").rule == "net"
    assert e.decide(WORKER, "net.http.get").rule == "net"
    assert e.decide(WORKER, "net").rule is None  # `>` needs at least one more token
    assert e.decide(WORKER, "spend.purchase").rule == "spend"
    assert e.decide(WORKER, "spend.purchase.now").rule is None  # `*` is exactly one token
    assert e.decide(WORKER, "spend").rule is None
    assert e.decide(WORKER, "a.b.c").rule == "mid"
    assert e.decide(WORKER, "a.b.d").rule is None
    # One rule can list exact names and patterns together.
    e = engine(r("mixed", ["fs.read", "deploy.>", "fs.read"]), r("rest", ">", "deny"))
    assert [e.decide(COORD, a).rule for a in ("fs.read", "deploy.x.y", "fs.write")] == ["mixed", "mixed", "rest"]
    assert e.candidates("fs.read") == tuple(x for x in e.rules)


def test_default_policy_decisions() -> None:
    policy = load_policy(DEFAULTS / "default.toml")
    e = policy.engine
    assert (e.decide(WORKER, "spend.purchase", {"amount_usd": 5.01}).effect) == "deny"  # T3 above a worker's T2
    assert (e.decide(COORD, "spend.purchase", {"amount_usd": 5.01}).rule) == "large-spend"
    assert e.decide(WORKER, "net.http", {"host": "api.example.com"}).rule is None
    assert e.decide(WORKER, "net.http", {"host": "svc.internal"}).effect == "allow"
    assert e.decide(WORKER, "model.call", {}).rule == "paid-models"


# The memo must not change a single answer: compare with a reference that scans every rule in order.

TOKENS = ["a", "b", "c"]
WHENS = [None, None, "x > 2", "x == 1 || y > 0", 'agent.role == "worker"', 'action == "a.b"', "y > 0", 'x == "s"']
pattern_st = st.lists(st.sampled_from(TOKENS + ["*"]), min_size=0, max_size=2).flatmap(
    lambda head: st.sampled_from([head + [t] for t in TOKENS + ["*", ">"]]).map(".".join))
rule_st = st.fixed_dictionaries({
    "actions": st.lists(pattern_st, min_size=1, max_size=3),
    "effect": st.sampled_from(["allow", "deny", "approve"]),
    "tier": st.sampled_from(list(TIERS)),
    "when": st.sampled_from(WHENS),
})
action_st = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(".".join)
attrs_st = st.fixed_dictionaries({}, optional={"x": st.integers(0, 4), "y": st.integers(-1, 1)})
subject_st = st.sampled_from([WORKER, OBSERVER, COORD, Subject("agt_1", "one", "worker", "T1")])


SHADOW = re.compile(r"^rule '([^']+)' can never match '([^']+)'")


def reference(rules: list[dict[str, Any]], subject: Subject, action: str, attrs: dict[str, Any]) -> tuple:
    """The obvious, slow reading of the semantics: every rule, in order, no candidate selection."""
    for i, rule in enumerate(rules):
        if not any(matches(p, action) for p in rule["actions"]):
            continue
        if rule["when"] is not None:
            ctx = {k: v for k, v in attrs.items() if k not in ("agent", "action")}
            ctx |= {"action": action, "agent": subject.as_cel()}
            try:
                held = cel.compile(rule["when"]).execute(cel.Context(ctx)) is True
            except Exception:  # noqa: BLE001
                if rule["effect"] == "allow":
                    continue  # only an allow rule is skipped; deny and approve rules fail closed
                held = True
            if not held:
                continue
        if rule["effect"] == "deny":
            return ("deny", f"r{i}", rule["tier"])
        if TIERS.index(rule["tier"]) > TIERS.index(subject.max_tier):
            return ("deny", f"r{i}", rule["tier"])
        if rule["effect"] == "approve" or rule["tier"] == "T3":
            return ("approve", f"r{i}", rule["tier"])
        return ("allow", f"r{i}", rule["tier"])
    return ("deny", None, None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rule_st, max_size=12), st.lists(st.tuples(subject_st, action_st, attrs_st), min_size=1, max_size=25))
def test_candidate_memo_matches_a_full_scan(rules: list[dict[str, Any]], queries: list[tuple]) -> None:
    doc_rules = [{"id": f"r{i}", **{k: v for k, v in rule.items() if v is not None}} for i, rule in enumerate(rules)]
    e = engine(*doc_rules)
    # What lint calls shadowed must really never decide: (rule id, pattern) pairs from its warnings.
    problems, _ = check_document({"id": "t", "version": 1, "rules": doc_rules}, "t.toml")
    shadowed = [SHADOW.search(p.message).groups() for p in problems if p.severity == "warning"]
    for _ in range(2):  # the second pass answers from the memo
        for subject, action, attrs in queries:
            d = e.decide(subject, action, attrs)
            assert (d.effect, d.rule, d.tier) == reference(rules, subject, action, attrs), (action, attrs, subject.role)
            assert d == e.decide(subject, action, attrs)
            assert not [(rid, pat) for rid, pat in shadowed if d.rule == rid and matches(pat, action)]
            # Explaining never changes the answer.
            x = e.decide(subject, action, attrs, explain=True)
            assert (x.effect, x.rule, x.tier, x.reason) == (d.effect, d.rule, d.tier, d.reason)


def test_memo_overflow_keeps_answers_right() -> None:
    e = engine(r("one", "svc.*.op", "deny"), r("rest", "svc.>", tier="T1"))
    for i in range(10_050):
        assert e.decide(WORKER, f"svc.s{i}.op").rule == "one"
    assert len(e._memo) <= 10_001
    assert e.decide(WORKER, "svc.s1.other").rule == "rest"
    assert e.decide(WORKER, "svc.s1.op").rule == "one"


def test_decision_to_dict() -> None:
    d = engine(r("x", "a.b", tier="T1")).decide(WORKER, "a.b", explain=True)
    assert d.to_dict() == {"effect": "allow", "rule": "x", "tier": "T1", "reason": "allowed by rule 'x'",
                           "path": ["x: matches"]}
    assert isinstance(d, Decision) and d.allowed


def test_rule_dataclass_matches_action() -> None:
    rule = Rule("x", ("fs.*", "net.>"), "allow", "T1", "")
    assert rule.matches_action("fs.read") and rule.matches_action("net.a.b") and not rule.matches_action("fs.a.b")


# -- `charter policy test` -----------------------------------------------------------------------


def test_policy_test_passes_on_the_default_files(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    proc = charter(home, "policy", "test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = tomllib.loads((DEFAULTS / "tests" / "default.toml").read_text())["case"]
    assert f"{len(cases)} passed, 0 failed" in proc.stdout.splitlines()
    report = json.loads(charter(home, "policy", "test", "--json").stdout)
    assert (report["passed"], report["failed"]) == (len(cases), 0)
    assert all(c["ok"] for c in report["cases"])


def test_a_failing_case_exits_1_and_says_what_it_expected_and_got(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    tests = home.policies_dir / "tests" / "extra.toml"
    tests.write_text('policy = "default"\n\n'
                     '[[case]]\nname = "sandbox writes are allowed"\nrole = "worker"\naction = "fs.write"\nexpect = "allow"\n\n'
                     '[[case]]\nname = "wrongly thinks a small spend waits"\nrole = "coordinator"\naction = "spend.purchase"\n'
                     'attrs = { amount_usd = 1 }\nexpect = "approve"\nrule = "large-spend"\n\n'
                     '[[case]]\nname = "wrong rule"\nmax_tier = "T2"\naction = "fs.read"\nexpect = "allow"\nrule = "publish"\n')
    proc = charter(home, "policy", "test")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAIL extra.toml: wrongly thinks a small spend waits" in out
    assert "expected approve by rule 'large-spend', got allow by rule 'spend'" in out
    assert "expected allow by rule 'publish', got allow by rule 'sandbox-files'" in out
    assert "PASS extra.toml: sandbox writes are allowed" in out
    defaults = (home.policies_dir / "tests" / "default.toml").read_text().count("[[case]]")
    assert f"{defaults + 1} passed, 2 failed" in out.splitlines()

    report = json.loads(charter(home, "policy", "test", str(tests), "--json").stdout)
    assert (report["passed"], report["failed"]) == (1, 2)
    failed = {c["name"]: c for c in report["cases"] if not c["ok"]}
    assert failed["wrongly thinks a small spend waits"] | {"detail": None, "file": None} == {
        "name": "wrongly thinks a small spend waits", "ok": False, "expected": "approve", "got": "allow",
        "rule": "spend", "detail": None, "file": None}


def test_a_case_naming_an_unknown_role_is_an_error(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    bad = home.policies_dir / "tests" / "roles.toml"
    bad.write_text('policy = "default"\n\n[[case]]\nname = "a wizard"\nrole = "wizard"\naction = "fs.read"\nexpect = "allow"\n')
    proc = charter(home, "policy", "test", str(bad))
    assert proc.returncode == 1
    assert "role 'wizard' is not in charter.toml" in proc.stderr
    assert "case[0]" in proc.stderr and str(bad) in proc.stderr
    assert "passed" not in proc.stdout


def test_a_test_file_for_a_missing_or_broken_policy_is_an_error(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    t = home.policies_dir / "tests" / "ghost.toml"
    t.write_text('policy = "ghost"\n\n[[case]]\nrole = "worker"\naction = "fs.read"\nexpect = "allow"\n')
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and "cannot read policy" in proc.stderr
    t.write_text('policy = "default"\n\n[[case]]\nrole = "worker"\naction = "fs.read"\nexpect = "maybe"\n')
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and "needs `action` and `expect`" in proc.stderr


def test_a_case_with_an_unknown_key_is_refused_naming_key_case_and_line(tmp_path: Path) -> None:
    """A misspelt key would silently test something else (here: any expectation at all)."""
    home = make_home(tmp_path / "h")
    t = home.policies_dir / "tests" / "typo.toml"
    t.write_text('policy = "default"\n\n[[case]]\nname = "fine"\nrole = "worker"\naction = "fs.read"\nexpect = "allow"\n\n'
                 '[[case]]\nname = "misspelt"\nrole = "worker"\naction = "fs.read"\nexpect = "allow"\n'
                 'atrs = { path = "x" }\n')
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and "passed" not in proc.stdout
    err = " ".join(proc.stderr.split())
    assert "case 'misspelt': unknown key 'atrs'" in err and f"{t}:14: case[1]" in err, proc.stderr
    t.write_text('policy = "default"\nsuite = "x"\n\n[[case]]\nrole = "worker"\naction = "fs.read"\nexpect = "allow"\n')
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and "unknown key 'suite'" in proc.stderr and f"{t}:2" in proc.stderr


def test_a_bad_max_tier_in_a_case_is_a_clear_error(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    t = home.policies_dir / "tests" / "tier.toml"
    t.write_text('policy = "default"\n\n[[case]]\nname = "tier typo"\nmax_tier = "T9"\naction = "fs.read"\n'
                 'expect = "allow"\n')
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "case 'tier typo': max_tier 'T9' is not one of T0, T1, T2, T3" in err and f"{t}:5: case[0]" in err


def test_policy_test_errors_give_the_line(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    t = home.policies_dir / "tests" / "lines.toml"
    t.write_text('policy = "default"\n\n[[case]]\nname = "no expectation"\nrole = "worker"\naction = "fs.read"\n'
                 'expect = "maybe"\n')
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and f"{t}:7: case[0]" in " ".join(proc.stderr.split())
    t.write_text('policy = "default"\n\n[[case]]\nrole = "worker"\naction = fs.read\n')  # not TOML
    proc = charter(home, "policy", "test", str(t))
    assert proc.returncode == 1 and "not valid TOML" in proc.stderr and f"{t}:5" in proc.stderr


def test_an_unknown_max_tier_denies_instead_of_crashing() -> None:
    e = engine(r("w", "fs.write", tier="T1"))
    d = e.decide(Subject("a", "a", "worker", "T9"), "fs.write", {})
    assert d.effect == "deny" and "max_tier 'T9' is not one of T0, T1, T2, T3" in d.reason


# One use of every function lint accepts: each must compile and evaluate in the engine's CEL.
CEL_SAMPLES = {
    "size": 'size("ab") == 2', "contains": '"ab".contains("a")', "startsWith": '"ab".startsWith("a")',
    "endsWith": '"ab".endsWith("b")', "matches": '"ab".matches("^a")', "int": 'int("1") == 1',
    "uint": "uint(1) == uint(1)", "double": "double(1) == 1.0", "string": 'string(1) == "1"',
    "bytes": 'bytes("a") == b"a"', "type": "type(1) == int", "dyn": "dyn(1) == 1",
    "timestamp": 'timestamp("2020-01-01T00:00:00Z") < timestamp("2021-01-01T00:00:00Z")',
    "duration": 'duration("1s") < duration("2s")',
    **{f: f'timestamp("2020-01-01T00:00:00Z").{f}() >= 0' for f in (
        "getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfYear", "getDayOfWeek", "getHours",
        "getMinutes", "getSeconds", "getMilliseconds")},
    "of": "optional.of(1).hasValue()", "ofNonZeroValue": "optional.ofNonZeroValue(1).hasValue()",
    "none": "!optional.none().hasValue()", "hasValue": "optional.of(1).hasValue()",
    "value": "optional.of(1).value() == 1", "or": "optional.none().or(optional.of(1)).value() == 1",
    "orValue": "optional.none().orValue(1) == 1",
}


def test_every_cel_function_lint_accepts_is_real_and_others_are_not() -> None:
    from charter.policy.engine import CEL_FUNCTIONS, compile_condition, unknown_functions

    assert set(CEL_SAMPLES) == set(CEL_FUNCTIONS)
    for name, expr in CEL_SAMPLES.items():
        program = compile_condition(expr)
        assert name in program.functions() and unknown_functions(program) == [], name
        assert program.execute(cel.Context({})) is True, (name, expr)
    # Names lint refuses really are missing: they compile, then fail when evaluated.
    for expr in ('"ab".endswith("b")', "max(1, 2) == 2", '"A".lowerAscii() == "a"', '"a,b".split(",") == []'):
        program = compile_condition(expr)
        assert unknown_functions(program), expr
        with pytest.raises(Exception, match="Undefined variable or function"):
            program.execute(cel.Context({}))


# -- binding: the charter's policy hash decides until renewal ---------------------------------


def test_the_hash_follows_meaning_not_formatting(tmp_path: Path) -> None:
    original = load_policy(DEFAULTS / "default.toml")
    d = tmp_path / "a"
    d.mkdir()
    # Comments dropped, keys reordered, strings requoted: the same policy, the same hash.
    doc = tomllib.loads((DEFAULTS / "default.toml").read_text())
    lines = [f"version = {doc['version']}", f"id = '{doc['id']}'", f"description = {json.dumps(doc['description'])}"]
    for rule in doc["rules"]:
        lines.append("[[rules]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in reversed(list(rule.items()))]
    (d / "default.toml").write_text("\n".join(lines) + "\n")
    assert load_policy(d / "default.toml").hash == original.hash
    # One changed effect is another policy.
    text = (DEFAULTS / "default.toml").read_text()
    # A comment is not meaning.
    (d / "default.toml").write_text(text.replace("# The default policy.", "# The default policy, reread."))
    assert load_policy(d / "default.toml").hash == original.hash
    changed = text.replace('\neffect = "approve"', '\neffect = "deny"', 1)
    assert changed != text
    (d / "default.toml").write_text(changed)
    assert load_policy(d / "default.toml").hash != original.hash



async def events(daemon: Daemon, pattern: str) -> list[dict[str, Any]]:
    answer = await daemon.admin("GET", "/v1/events", params={"pattern": pattern, "limit": 500})
    return [{**e["envelope"], "_seq": e["seq"]} for e in answer["events"]]


async def wait_for_event(daemon: Daemon, pattern: str, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        hits = [e for e in await events(daemon, pattern) if pred(e)]
        if hits:
            return hits[-1]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no event on {pattern} matched in {timeout}s")
        await asyncio.sleep(0.05)


def explain(home: Home, agent: str, action: str, attrs: dict[str, Any]) -> dict[str, Any]:
    proc = charter(home, "policy", "explain", "--agent", agent, "--action", action, "--attrs", json.dumps(attrs), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.anyio
@pytest.mark.slow
async def test_agents_keep_their_policy_text_until_renewal(daemon: Daemon) -> None:
    home = daemon.home
    alpha = await daemon.enroll("alpha", "worker")
    creds = home.root.parent / "alpha.creds.json"
    path = home.policies_dir / "default.toml"
    old = load_policy(path)
    assert alpha.creds.charter["policy"] == {"id": "default", "version": 1, "hash": old.hash}
    first = await alpha.act("fs.write", {"path": "notes.txt"})
    assert (first["effect"], first["decision"]["rule"]) == ("allow", "sandbox-files")

    # The operator edits the file: sandbox writes now denied, version bumped. Lint is clean.
    text = path.read_text()
    edited = text.replace("version = 1\n", "version = 2\n", 1).replace(
        'actions = ["fs.read", "fs.write", "fs.list", "fs.delete"]\neffect = "allow"',
        'actions = ["fs.read", "fs.write", "fs.list", "fs.delete"]\neffect = "deny"', 1)
    assert edited.count('effect = "deny"') == 1
    path.write_text(edited)
    assert lint_text(edited, str(path), "default")[0] == []
    new = load_policy(path)
    assert new.hash != old.hash and new.version == 2

    await alpha.close()
    assert stop(home)
    daemon = start_daemon(home)
    alpha = Agent.load(creds)
    try:
        # Still the old text: the charter names the old hash.
        again = await alpha.act("fs.write", {"path": "notes.txt"})
        assert (again["effect"], again["decision"]["rule"]) == ("allow", "sandbox-files")
        x = explain(home, "alpha", "fs.write", {"path": "notes.txt"})
        assert (x["effect"], x["rule"], x["tier"]) == ("allow", "sandbox-files", "T1")
        assert x["policy"] == {"id": "default", "version": 1, "hash": old.hash}
        assert x["policy_current"] is False
        assert x["path"] == ["sandbox-files: matches"] and x["max_tier"] == "T2"
        assert x["agent"] == "alpha" and x["agent_id"] == alpha.id and x["attrs"] == {"path": "notes.txt"}

        # Renewal rebinds to the current file's text.
        charter_doc = await alpha.renew()
        assert charter_doc["policy"] == {"id": "default", "version": 2, "hash": new.hash}
        assert (await alpha.charter())["policy"]["hash"] == new.hash
        after = await alpha.act("fs.write", {"path": "notes.txt"})
        assert (after["effect"], after["decision"]["rule"], after["decision"]["tier"]) == ("deny", "sandbox-files", "T1")
        x = explain(home, "alpha", "fs.write", {"path": "notes.txt"})
        assert (x["effect"], x["rule"], x["policy_current"]) == ("deny", "sandbox-files", True)
        assert x["policy"]["hash"] == new.hash
        # Unchanged rules decide as before, with a path that says why.
        x = explain(home, "alpha", "model.call", {"provider": "openai"})
        assert (x["effect"], x["rule"], x["tier"]) == ("allow", "paid-models", "T2")
        assert x["path"][0].startswith("local-models: action matches, condition")
        x = explain(home, "alpha", "teleport.now", {})
        assert (x["effect"], x["rule"], x["tier"]) == ("deny", None, None)
    finally:
        await alpha.close()


# -- decisions on the bus --------------------------------------------------------------------


@pytest.mark.anyio
async def test_act_publishes_a_decision_event(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    try:
        await alpha.act("fs.write", {"path": "a.txt"})
        await alpha.act("teleport.now", {})
        evs = await events(daemon, "charter.decisions.alpha")
        assert [e["sender"] for e in evs] == ["operator", "operator"]
        allowed, denied = (e["payload"] for e in evs)
        assert len(allowed.pop("request_id")) == 16  # the HTTP request that caused it, as in the access log
        assert allowed == {"agent_id": alpha.id, "action": "fs.write", "effect": "allow", "rule": "sandbox-files",
                           "tier": "T1", "reason": "files inside the agent's own sandbox"}
        assert (denied["action"], denied["effect"], denied["rule"]) == ("teleport.now", "deny", None)
        # The agent sees its own decisions in its view (the worker role subscribes to them).
        mine = await alpha.recent("charter.decisions.alpha")
        assert [e.payload["action"] for e in mine] == ["fs.write", "teleport.now"]
    finally:
        await alpha.close()


@pytest.mark.anyio
async def test_an_action_requested_on_the_bus_gets_a_decision_referencing_it(daemon: Daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    try:
        env = alpha.seal("agents.alpha.actions", {"action": "model.call", "attrs": {"provider": "ollama", "paid": False}}, kind="action")
        receipt = await alpha.publish_envelope(env)
        assert receipt["id"] == env.id
        ev = await wait_for_event(daemon, "charter.decisions.alpha",
                                  lambda e: (e["payload"].get("request") or {}).get("id") == env.id)
        assert ev["sender"] == "operator"
        assert ev["payload"]["request"] == {"id": env.id, "seq": receipt["seq"]}
        assert (ev["payload"]["action"], ev["payload"]["effect"], ev["payload"]["rule"]) == ("model.call", "allow", "local-models")
        assert ev["_seq"] > receipt["seq"]

        # A denied request over the bus (batched this time) is answered the same way.
        (res,) = await alpha.publish_many([("agents.alpha.actions", {"action": "shell.exec", "attrs": {"command": "ls"}})],
                                          kind="action")
        ev = await wait_for_event(daemon, "charter.decisions.alpha",
                                  lambda e: (e["payload"].get("request") or {}).get("seq") == res["seq"])
        assert ev["payload"]["request"] == {"id": res["id"], "seq": res["seq"]}
        assert (ev["payload"]["effect"], ev["payload"]["rule"], ev["payload"]["tier"]) == ("deny", "irreversible", "T3")

        # An ordinary event is not an action request: no decision for it.
        plain = await alpha.publish("agents.alpha.events", {"action": "model.call"})
        await asyncio.sleep(0.3)
        assert not [e for e in await events(daemon, "charter.decisions.alpha")
                    if (e["payload"].get("request") or {}).get("id") == plain["id"]]
    finally:
        await alpha.close()


SECRET_RULES = '''
[[rules]]
id = "no-secrets"
action = "bus.publish"
when = 'subject.matches("^agents\\\\.[^.]+\\\\.secret$")'
effect = "deny"
tier = "T0"
reason = "secrets stay off the bus"

[[rules]]
id = "deploy-notes"
action = "bus.publish"
when = 'subject.endsWith(".deploy")'
effect = "approve"
tier = "T1"
reason = "deploy notes need a human"

'''


@pytest.mark.anyio
async def test_a_publish_the_policy_denies_is_refused(tmp_path: Path) -> None:
    home = make_home(tmp_path / "h")
    path = home.policies_dir / "default.toml"
    text = path.read_text()
    edited = text.replace("[[rules]]\nid = \"publish\"", SECRET_RULES.lstrip() + "[[rules]]\nid = \"publish\"", 1)
    assert edited != text
    path.write_text(edited)
    assert lint_text(edited, str(path), "default")[0] == []
    daemon = start_daemon(home)
    try:
        alpha = await daemon.enroll("alpha", "worker")
        ok = await alpha.publish("agents.alpha.events", {"n": 1})
        assert ok["seq"] > 0
        with pytest.raises(CharterError) as exc:
            await alpha.publish("agents.alpha.secret", {"key": "hunter2"})
        assert exc.value.code == "policy_denied"
        assert "secrets stay off the bus" in exc.value.message and "no-secrets" in exc.value.message
        # Publishing cannot wait for an approval: an approve rule refuses it too.
        with pytest.raises(CharterError) as exc:
            await alpha.publish("agents.alpha.deploy", {"v": 1})
        assert exc.value.code == "policy_denied" and "use act()" in exc.value.message
        # In a batch, only the denied envelope is refused.
        results = await alpha.publish_many([("agents.alpha.events", {"n": 2}), ("agents.alpha.secret", {"n": 3})])
        assert "seq" in results[0] and results[1]["error"]["code"] == "policy_denied"
        # Nothing denied reached the log.
        assert await events(daemon, "agents.alpha.secret") == []
        assert len(await events(daemon, "agents.alpha.events")) == 2
        x = explain(home, "alpha", "bus.publish", {"subject": "agents.alpha.secret", "kind": "event"})
        assert (x["effect"], x["rule"]) == ("deny", "no-secrets")
        await alpha.close()
    finally:
        stop(home)


MEMO_RULES = (
    r("typed", "model.call", "deny", "T0", when='paid == true && string(amount_usd) == "-0"'),
    r("sized", "model.call", "approve", "T1", when="amount_usd > 5.0 || tokens > 1000"),
    r("named", "model.call", "allow", "T1", when='provider == "ollama" && agent.role == "worker"'),
    r("listed", "model.call", "deny", "T1", when='"x" in tags'),
    r("paid", "model.call", "allow", "T2"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.sampled_from([WORKER, OBSERVER, COORD]),
    st.fixed_dictionaries({}, optional={
        "provider": st.sampled_from(["ollama", "openai", "", "Ollama"]),
        "paid": st.sampled_from([True, False, 1, 0, 1.0, "true", None]),
        "amount_usd": st.sampled_from([0.0, -0.0, 5.0, 5.000001, 7, float("nan"), float("inf")]),
        "tokens": st.integers(min_value=-2, max_value=2000),
        "tags": st.lists(st.sampled_from(["x", "y"]), max_size=2)})), min_size=1, max_size=12))
@example([(WORKER, {"paid": True, "amount_usd": 0.0}), (WORKER, {"paid": True, "amount_usd": -0.0}),
          (WORKER, {"paid": 1, "amount_usd": -0.0}), (WORKER, {"paid": True}), (WORKER, {"paid": True})])
def test_remembered_conditions_decide_as_a_fresh_evaluation(calls: list[tuple[Subject, dict[str, Any]]]) -> None:
    """Decisions are remembered per set of values read; whatever came before, a decision is the one
    a fresh engine makes: `true` is not `1` nor `"true"`, `-0.0` is not `0.0` to `string()`, a list
    is not remembered, a missing attribute is an error (the allow rule skipped, the deny rule
    denying) every time, not only the first."""
    remembered = engine(*MEMO_RULES)
    for subject, attrs in calls:
        assert remembered.decide(subject, "model.call", attrs) == engine(*MEMO_RULES).decide(subject, "model.call", attrs)


def test_the_daemon_loads_cel_without_its_cli_and_the_package_still_imports_after() -> None:
    """`import cel` runs the package's CLI imports (typer, prompt_toolkit: ~0.3 s of every start);
    Charter loads only the extension. A later `import cel` (a user's script, a plugin) still works
    and shares that extension rather than initialising it twice."""
    code = (
        "import sys\n"
        "import charter.node\n"
        "assert 'prompt_toolkit' not in sys.modules and 'cel.cli' not in sys.modules, sorted(sys.modules)\n"
        "from charter.policy.cel_runtime import cel as ours\n"
        "assert ours.compile('a > 1').execute(ours.Context({'a': 2})) is True\n"
        "import cel\n"
        "assert cel.compile('a < 1').execute(cel.Context({'a': 2})) is False\n"
        "assert cel.Context is ours.Context\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

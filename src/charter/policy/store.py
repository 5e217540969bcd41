"""Policy files (`CHARTER_HOME/policies/ID.toml`), each identified by id, version and content hash.

The hash is SHA-256 over the canonical JSON of the parsed file, so reformatting a file or
reordering its keys does not change it, while any change of meaning does. Loading lints the file
first: a policy with an error is never half-loaded.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charter.bus.subjects import SubjectError, pattern_within, validate_pattern
from charter.encoding import canonical, sha256_hex
from charter.errors import ConfigError
from charter.policy.engine import CEL_FUNCTIONS, EFFECTS, TIERS, PolicyEngine, Rule, compile_condition, unknown_functions

RULE_KEYS = {"id", "action", "actions", "when", "tier", "effect", "reason"}
TOP_KEYS = {"id", "version", "description", "rules"}


@dataclass(frozen=True)  # no slots: `charter policy lint --json` serialises `vars(problem)`
class Problem:
    file: str
    line: int
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.severity}: {self.message}"


@dataclass(frozen=True, slots=True)
class Policy:
    id: str
    version: int
    hash: str
    description: str
    rules: tuple[dict[str, Any], ...]
    path: Path
    engine: PolicyEngine = field(repr=False, compare=False, hash=False)
    document: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def binding(self) -> dict[str, Any]:
        """What an agent's charter records: enough to prove which policy text bound it."""
        return {"id": self.id, "version": self.version, "hash": self.hash}

    def source(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "description": self.description, "rules": list(self.rules)}


class _Lines:
    """Maps `[[rules]]` number i and a key inside it to a line of the file (tomllib gives none)."""

    def __init__(self, text: str, table: str = "rules") -> None:
        self.lines = text.splitlines()
        self.table = table
        self.headers = [i + 1 for i, ln in enumerate(self.lines) if re.match(rf"\s*\[\[\s*{table}\s*\]\]", ln)]
        self.inline = self._inline_tables() if not self.headers else []

    def rule(self, index: int, key: str | None = None) -> int:
        if not self.headers and index < len(self.inline):
            return self._inline_line(index, key)
        if index >= len(self.headers):
            return 1
        start = self.headers[index]
        if key is None:
            return start
        end = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.lines) + 1
        pat = re.compile(rf"\s*{re.escape(key)}\s*=")
        for n in range(start, end - 1):
            if pat.match(self.lines[n]):
                return n + 1
        return start

    # `rules = [ {...}, {...} ]`: each inline table's span, so its problems name its own line.

    def _inline_tables(self) -> list[tuple[int, int]]:
        """Character spans of the inline tables in a top-level `TABLE = [...]` array (strings and
        comments skipped, so a brace inside a reason or a CEL string does not count)."""
        text = "\n".join(self.lines)
        self._text = text
        m = re.search(rf"(?m)^\s*{re.escape(self.table)}\s*=\s*\[", text)
        if m is None:
            return []
        spans: list[tuple[int, int]] = []
        i, depth, start = m.end(), 0, -1  # depth: braces open inside the array
        brackets = 1
        while i < len(text) and brackets:
            c = text[i]
            if c == "#":
                nl = text.find("\n", i)
                i = len(text) if nl < 0 else nl
                continue
            if c in "\"'":
                i = _skip_string(text, i)
                continue
            if c == "{":
                if depth == 0:
                    start = i
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0 and start >= 0:
                    spans.append((start, i + 1))
            elif c == "[" and depth == 0:
                brackets += 1
            elif c == "]" and depth == 0:
                brackets -= 1
            i += 1
        return spans

    def _inline_line(self, index: int, key: str | None) -> int:
        start, end = self.inline[index]
        at = start
        if key is not None:
            m = re.compile(rf"(?<![\w-]){re.escape(key)}\s*=").search(self._text, start, end)
            if m is not None:
                at = m.start()
        return self._text.count("\n", 0, at) + 1

    def top(self, key: str) -> int:
        pat = re.compile(rf"\s*{re.escape(key)}\s*=")
        for n, ln in enumerate(self.lines):
            if self.headers and n + 1 >= self.headers[0]:
                break
            if pat.match(ln):
                return n + 1
        # A top-level key given as a table (`[meta]`, `[meta.x]`, `[[meta]]`) may come after the rules.
        header = re.compile(rf"\s*\[\[?\s*{re.escape(key)}\s*[\].]")
        for n, ln in enumerate(self.lines):
            if header.match(ln):
                return n + 1
        return 1


def _skip_string(text: str, i: int) -> int:
    """The index just past the TOML string that starts at `i` (basic, literal, or multi-line)."""
    q = text[i]
    if text.startswith(q * 3, i):
        end = text.find(q * 3, i + 3)
        return len(text) if end < 0 else end + 3
    j = i + 1
    while j < len(text) and text[j] != q and text[j] != "\n":
        j += 2 if q == '"' and text[j] == "\\" else 1
    return j + 1


def lint_text(text: str, file: str, stem: str | None = None) -> tuple[list[Problem], dict[str, Any] | None, list[Rule]]:
    """Every problem in a policy's text, the parsed document, and its compiled rules."""
    problems: list[Problem] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        return [Problem(file, int(m.group(1)) if m else 1, f"not valid TOML: {exc}")], None, []
    problems, rules = check_document(data, file, stem, _Lines(text))
    return problems, data, rules


def check_document(data: dict[str, Any], file: str, stem: str | None = None,
                   lines: _Lines | None = None) -> tuple[list[Problem], list[Rule]]:
    """Lint a parsed policy and compile its rules; `lines` maps problems back to the file."""
    problems: list[Problem] = []
    lines = lines or _Lines("")
    err = lambda line, msg: problems.append(Problem(file, line, msg))  # noqa: E731

    for key in data:
        if key not in TOP_KEYS:
            err(lines.top(key), f"unknown key {key!r}; a policy has {', '.join(sorted(TOP_KEYS))}")
    pid = data.get("id")
    if not isinstance(pid, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", pid):
        err(lines.top("id"), "a policy needs an `id`: lowercase letters, digits, '-' or '_'")
    elif stem is not None and pid != stem:
        err(lines.top("id"), f"policy id {pid!r} must match its file name {stem!r}")
    version = data.get("version")
    if type(version) is not int or version < 1:
        err(lines.top("version"), "a policy needs an integer `version` of 1 or more")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        err(lines.top("rules"), "`rules` must be an array of tables: [[rules]]")
        raw_rules = []

    compiled: list[Rule] = []
    seen: dict[str, int] = {}
    unconditional: dict[str, str] = {}
    for i, r in enumerate(raw_rules):
        at = lambda key=None, i=i: lines.rule(i, key)  # noqa: E731
        if not isinstance(r, dict):
            err(at(), "each rule must be a table")
            continue
        for key in r:
            if key not in RULE_KEYS:
                err(at(key), f"unknown key {key!r} in a rule; rules have {', '.join(sorted(RULE_KEYS))}")
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            err(at("id") if "id" in r else at(), "every rule needs a string `id`")
            rid = f"#{i + 1}"
        elif rid in seen:
            err(at("id"), f"rule id {rid!r} is used twice (first at line {seen[rid]})")
        else:
            seen[rid] = at("id")
        if "action" in r and "actions" in r:
            err(at("actions"), "give `action` or `actions`, not both")
        acts = r.get("actions", [r["action"]] if "action" in r else None)
        if isinstance(acts, str):
            acts = [acts]
        if not acts or not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
            err(at("action") if "action" in r else at("actions") if "actions" in r else at(),
                f"rule {rid!r} needs `action` (a pattern such as \"fs.write\" or \"net.>\") or `actions`")
            acts = []
        for a in acts:
            try:
                validate_pattern(a)
            except SubjectError as exc:
                err(at("action") if "action" in r else at("actions"), f"rule {rid!r}: bad action pattern: {exc}")
        effect = r.get("effect")
        if effect not in EFFECTS:
            err(at("effect") if "effect" in r else at(), f"rule {rid!r}: `effect` must be one of {', '.join(EFFECTS)}")
        tier = r.get("tier")
        if tier not in TIERS:
            err(at("tier") if "tier" in r else at(), f"rule {rid!r}: `tier` must be one of {', '.join(TIERS)}")
        when = r.get("when")
        program = None
        if when is not None:
            if not isinstance(when, str) or not when.strip():
                err(at("when"), f"rule {rid!r}: `when` must be a CEL expression in a string")
            else:
                try:
                    program = compile_condition(when)
                except ValueError as exc:
                    first = str(exc).split("\n")[0]
                    err(at("when"), f"rule {rid!r}: condition does not compile: {first}")
                else:
                    for name in unknown_functions(program):
                        err(at("when"), f"rule {rid!r}: condition calls {name}(), which CEL does not have"
                            f"{_did_you_mean(name)}; it would fail every time it is evaluated")
        reason = r.get("reason", "")
        if not isinstance(reason, str):
            err(at("reason"), f"rule {rid!r}: `reason` must be a string")
            reason = ""
        for a in acts:
            above = next((u for u in unconditional if pattern_within(a, u)), None) if _valid(a) else None
            if above is not None:
                problems.append(Problem(file, at(), f"rule {rid!r} can never match {a!r}: rule "
                                        f"{unconditional[above]!r} above it matches first", "warning"))
        if when is None:
            for a in acts:
                if _valid(a):
                    unconditional.setdefault(a, rid)
        if effect in EFFECTS and tier in TIERS and acts:
            compiled.append(Rule(rid, tuple(acts), effect, tier, reason, when, i, program))
    return problems, compiled


def _did_you_mean(name: str) -> str:
    import difflib

    same = [f for f in CEL_FUNCTIONS if f.lower() == name.lower()]
    close = same or difflib.get_close_matches(name, sorted(CEL_FUNCTIONS), n=1, cutoff=0.7)
    return f" (did you mean {close[0]}()?)" if close else f" (it has {', '.join(sorted(CEL_FUNCTIONS))})"


def _valid(pattern: str) -> bool:
    try:
        validate_pattern(pattern)
    except SubjectError:
        return False
    return True


def policy_from_document(data: dict[str, Any], path: Path) -> Policy:
    """A Policy from a parsed (and previously stored) document; raises ConfigError if it is invalid."""
    problems, rules = check_document(data, str(path))
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors[0].message, f"{path}:{errors[0].line}")
    h = sha256_hex(canonical(data))
    return Policy(data["id"], data["version"], h, str(data.get("description", "")),
                  tuple(data.get("rules", [])), path, PolicyEngine(data["id"], data["version"], h, rules), data)


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy: {exc}", str(path)) from None
    problems, data, rules = lint_text(text, str(path), path.stem)
    errors = [p for p in problems if p.severity == "error"]
    if errors or data is None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more; run `charter policy lint`)" if len(errors) > 1 else ""
        raise ConfigError(first.message + more, f"{first.file}:{first.line}")
    h = sha256_hex(canonical(data))
    engine = PolicyEngine(data["id"], data["version"], h, rules)
    return Policy(data["id"], data["version"], h, str(data.get("description", "")),
                  tuple(data.get("rules", [])), path, engine, data)


def load_policies(directory: Path) -> dict[str, Policy]:
    return {p.id: p for p in (load_policy(f) for f in sorted(directory.glob("*.toml")))}


VERSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_versions (
    hash       TEXT PRIMARY KEY,
    id         TEXT NOT NULL,
    version    INTEGER NOT NULL,
    document   TEXT NOT NULL,
    first_seen INTEGER NOT NULL
);
"""


class PolicyVersions:
    """Every policy text that ever bound an agent, by content hash.

    A charter names the hash of the policy it was issued under, and that exact text keeps deciding
    for the agent after the file is edited, until the charter is renewed under the new one.
    """

    def __init__(self, db_path: Path) -> None:
        import json
        import time

        from charter.db import connect

        self._json, self._time = json, time
        self._db = connect(db_path)
        self._db.executescript(VERSIONS_SCHEMA)

    def remember(self, policy: Policy) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO policy_versions VALUES (?,?,?,?,?)",
            (policy.hash, policy.id, policy.version, self._json.dumps(policy.document), self._time.time_ns() // 1_000_000),
        )

    def load_all(self, directory: Path) -> dict[str, Policy]:
        out: dict[str, Policy] = {}
        for h, pid, _version, doc in self._db.execute("SELECT hash, id, version, document FROM policy_versions"):
            try:
                out[h] = policy_from_document(self._json.loads(doc), directory / f"{pid}.toml")
            except ConfigError:
                continue  # an old text that no longer compiles cannot decide: its agents are denied
        return out

    def close(self) -> None:
        self._db.close()

"""Truths: declarative claims about the system, each with a severity and a fix hint.

Built-in truths are functions over the live state (see `capsules.state.live_state`); user truths are
CEL expressions over the same state (`[[truths]]` in charter.toml), e.g.
`agents.filter(a, a.status == "active").size() >= 2`. A truth returns its evidence: one line per
contradiction found; none means it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Any

from charter.policy.cel_runtime import cel

SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class Truth:
    id: str
    claim: str
    severity: str
    fix: str
    check: Callable[[dict[str, Any]], list[str]]
    source: str = "built-in"


def _active(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in state.get("agents", []) if a["status"] == "active"]


def agents_are_bound(state: dict[str, Any]) -> list[str]:
    out = []
    for a in _active(state):
        missing = [what for what, ok in (
            ("sandbox", bool((a.get("sandbox") or {}).get("path"))),
            ("scoped view", bool((a.get("scopes") or {}).get("publish") or (a.get("scopes") or {}).get("subscribe"))),
            ("policy binding", bool((a.get("policy") or {}).get("hash"))),
        ) if not ok]
        if missing:
            out.append(f"agent {a['name']} has no {' and no '.join(missing)}")
            continue
        if not state.get("_sandbox_exists", {}).get(a["id"], True):
            out.append(f"agent {a['name']}'s sandbox directory {a['sandbox']['path']} is missing")
        if not state.get("_policy_known", {}).get(a["id"], True):  # governance would deny it everything
            out.append(f"agent {a['name']}'s policy binding ({a['policy'].get('id')} "
                       f"sha256:{str(a['policy']['hash'])[:12]}) names a policy not known here")
    return out


_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _server(backend: dict[str, Any]) -> str:
    """Where a backend runs (host:port): two backend names on one server fail together."""
    url = backend.get("url") or ""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        host, port = "", None
    if not host:
        return f"backend {backend['backend']}"
    return f"{'loopback' if host in _LOOPBACK else host}:{port}"


def aliases_fall_back(state: dict[str, Any]) -> list[str]:
    """A fallback is another server, or degraded mode: a second model on the same server is not one.

    An alias whose models span several servers must have at least two of them reachable (circuit
    closed), so one server going down leaves a real answer; an alias on one server has degraded
    mode as its only fallback, which the second half (ends in degraded) checks.
    """
    models = state.get("models") or {}
    backends = {b["backend"]: b for b in models.get("backends", [])}
    out = []
    for alias, chain in (models.get("aliases") or {}).items():
        if chain[-1] != "degraded":
            out.append(f"alias {alias} does not end in degraded mode: {' -> '.join(chain)}")
        servers: dict[str, bool] = {}  # server -> reachable, in chain order
        for ref in chain:
            if ref == "degraded":
                continue
            b = backends.get(ref.split("/", 1)[0]) or {"backend": ref.split("/", 1)[0]}
            server = _server(b)
            servers[server] = servers.get(server, False) or b.get("state") == "closed"
        live = [s for s, up in servers.items() if up]
        if len(servers) > 1 and len(live) < 2:
            out.append(f"alias {alias} has no reachable fallback: {len(live)} of its {len(servers)} servers "
                       f"({', '.join(servers)}) are up")
        elif len(servers) == 1 and chain[-1] != "degraded":
            out.append(f"alias {alias} has no fallback: all its models are on {next(iter(servers))}")
    return out


def spenders_have_budgets(state: dict[str, Any]) -> list[str]:
    out = []
    limited = {b["scope"] for b in state.get("budgets", []) if b["unit"] == "usd"}
    global_limit = "global" in limited
    for a in _active(state):
        if a.get("max_tier") in ("T2", "T3") and f"agent:{a['id']}" not in limited and f"role:{a['role']}" not in limited \
                and not global_limit:
            out.append(f"agent {a['name']} may spend (tier {a['max_tier']}) but has no USD budget")
    return out


def no_budget_overrun(state: dict[str, Any]) -> list[str]:
    return [f"{b['name']} {b['period']} {b['unit']} budget is overrun: {b['used']:g} of {b['limit']:g}"
            for b in state.get("budgets", []) if b.get("overrun")]


def services_checked_and_up(state: dict[str, Any]) -> list[str]:
    services = state.get("services")
    if not isinstance(services, list):
        return []
    now = time.time()
    out = []
    for s in services:
        label = s.get("label") or s.get("service")
        interval = float(s.get("interval") or 300)
        last = s.get("last_checked")
        if last is None or now - float(last) > 2 * interval:
            out.append(f"service {label} was not checked within twice its interval ({interval:g}s)")
        if s.get("tier") == "critical" and s.get("status") not in ("ok", "up", "passing"):
            out.append(f"critical service {label} is {s.get('status')}")
    return out


def archive_verifies(state: dict[str, Any]) -> list[str]:
    archive = state.get("archive")
    if not isinstance(archive, dict) or "error" in archive and len(archive) == 1:
        return [f"archive status unavailable: {archive['error']}"] if isinstance(archive, dict) else []
    out = []
    if archive.get("verified") is False:
        out.append(f"the archive does not verify: {archive.get('first_bad_seq') or archive.get('reason')}")
    max_age = float(archive.get("sync_max_age_s") or 86400)
    last = archive.get("last_sync_at")
    if archive.get("mirrors") and (last is None or time.time() - float(last) > max_age):
        out.append("the archive's last sync to its mirrors is older than " + f"{max_age:g}s")
    return out


def capsule_fresh(state: dict[str, Any]) -> list[str]:
    capsule = state.get("capsule") or {}
    built = capsule.get("built_at")
    max_age = float(capsule.get("max_age_s") or 3600)
    if built is None:
        return ["the AI_ALIGNMENT capsule has never been built"]
    if time.time() - float(built) > max_age:
        return [f"the AI_ALIGNMENT capsule is older than {max_age:g}s"]
    return []


def t3_needs_approval(state: dict[str, Any]) -> list[str]:
    """Findings of the reflector's T3 audit (`engine.T3Audit`); each names the log entry that ran."""
    return [f"T3 action {d['action']} by {d['agent']} (seq {d['seq']}) ran without a valid approval: {d['why']}"
            for d in state.get("_unapproved_t3", [])]


def charters_current(state: dict[str, Any]) -> list[str]:
    now = time.time() * 1000
    return [f"agent {a['name']}'s charter expired at {a['expires_at']}" for a in _active(state)
            if a.get("expires_at_ms") and a["expires_at_ms"] <= now]


BUILT_IN: list[Truth] = [
    Truth("agents-bound", "Every active agent has a sandbox, a scoped view and a policy binding.", "critical",
          "re-enrol the agent, or renew its charter to rebind it", agents_are_bound),
    Truth("aliases-fall-back", "Every alias has a reachable fallback and ends in degraded mode.", "warning",
          "end the alias with `degraded` in [models.aliases]; a fallback is a backend on another server (a second "
          "model on the same server is not one); check `charter models health`",
          aliases_fall_back),
    Truth("spenders-budgeted", "Every agent that can spend has a budget.", "warning",
          "set one: `charter budget set --scope agent:NAME --limit 1`, or give the role budget_usd_per_day",
          spenders_have_budgets),
    Truth("budgets-held", "No budget is overrun.", "critical",
          "look at `charter budget history --by agent`; lower limits or suspend the agent", no_budget_overrun),
    Truth("services-up", "Every service was checked within twice its interval, and every critical one is up.",
          "critical", "`charter services list`; restart with `charter services restart LABEL`", services_checked_and_up),
    Truth("archive-verifies", "The archive verifies and its last sync is fresh.", "critical",
          "`charter archive verify` names the first bad entry; check the mirrors' paths", archive_verifies),
    Truth("capsule-fresh", "The AI_ALIGNMENT capsule is fresh.", "warning",
          "`charter capsule build`; the daemon rebuilds it on a schedule", capsule_fresh),
    Truth("t3-approved", "No T3 action ran without an approval.", "critical",
          "investigate the agent: revoke it if the action was not expected; if it was, "
          "`charter reflect ack SEQ --note WHY` (an operator-signed event). Approving afterwards does not "
          "clear it: the action already ran", t3_needs_approval),
    Truth("charters-current", "No active agent's charter is past expiry.", "warning",
          "`charter agents renew NAME` (operator) or the agent renews itself", charters_current),
]


def user_truth(doc: dict[str, Any], where: str) -> Truth:
    """A truth from config: {id, claim, severity, fix, expect (CEL over the state)}."""
    from charter.errors import ConfigError

    tid, expr = doc.get("id"), doc.get("expect")
    if not isinstance(tid, str) or not isinstance(expr, str):
        raise ConfigError("a truth needs `id` and `expect` (a CEL expression over the state)", where)
    severity = doc.get("severity", "warning")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of {', '.join(SEVERITIES)}", f"{where}.severity")
    try:
        program = cel.compile(expr)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"`expect` does not compile: {str(exc).splitlines()[0]}", f"{where}.expect") from None

    def check(state: dict[str, Any]) -> list[str]:
        visible = {k: v for k, v in state.items() if not k.startswith("_")}
        try:
            held = program.execute(cel.Context(visible))
        except Exception as exc:  # noqa: BLE001 - a claim that cannot be evaluated is not true
            return [f"could not evaluate `{expr}`: {str(exc).splitlines()[0][:160]}"]
        return [] if held is True else [f"`{expr}` is {held!r}"]

    return Truth(tid, str(doc.get("claim") or expr), severity, str(doc.get("fix", "")), check, "config")

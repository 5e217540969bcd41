"""Checks: does a service work, not only exist. Each kind is one coroutine returning a CheckResult.

  launchd    `launchctl print DOMAIN/LABEL`: loaded, a PID (or, with running = false, last exit code 0)
  systemd    `systemctl [--user] show UNIT`: ActiveState among `states` (default active)
  process    a pidfile's process is alive, or processes by exact name / command-line substring
  tcp        a connection is accepted within the timeout
  http       status (default 2xx/3xx), body contains a string, a JSON field has a value
  command    exits with `exit_code` (default 0) within the timeout
  model      a deep generation probe through the gateway (`Router.probe`): a non-empty answer
  freshness  a file (or the newest glob match, or a receipt's generated_at) is younger than max_age

Every check runs under the service's timeout; an exception is a failed check with its reason, never
a crash of the supervisor. `CheckContext` holds what checks share: one HTTP connection pool, one
process table per second (so a thousand process checks read /proc once), the gateway's router.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import glob as globmod
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from charter.supervisor.specs import ServiceConfig

if TYPE_CHECKING:
    import aiohttp

    from charter.models.router import Router

MAX_BODY = 1 << 20


@dataclass(slots=True)
class CheckResult:
    ok: bool
    detail: str = ""
    ms: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "ms": round(self.ms, 2), **({"data": self.data} if self.data else {})}


class ProcessTable:
    """A snapshot of (pid, name, cmdline) shared by every process check within `ttl` seconds."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._at = -1e9
        self._rows: list[tuple[int, str, str]] = []
        self._lock = asyncio.Lock()

    @staticmethod
    def _read() -> list[tuple[int, str, str]]:
        rows = []
        me = os.getpid()
        for p in psutil.process_iter(["pid", "name", "cmdline", "status"], ad_value=None):
            info = p.info
            if info["pid"] == me or info.get("status") == psutil.STATUS_ZOMBIE:
                continue
            rows.append((info["pid"], info.get("name") or "", " ".join(info.get("cmdline") or ())))
        return rows

    async def rows(self) -> list[tuple[int, str, str]]:
        if time.monotonic() - self._at <= self.ttl:
            return self._rows
        async with self._lock:
            if time.monotonic() - self._at > self.ttl:
                self._rows = await asyncio.to_thread(self._read)
                self._at = time.monotonic()
        return self._rows


class CheckContext:
    """What checks share. Create one per supervisor; `close()` releases the HTTP pool."""

    def __init__(self, *, concurrency: int = 64, router: Router | None = None, base_dir: Path | None = None) -> None:
        self.concurrency = concurrency
        self.router = router
        self.base_dir = base_dir or Path.cwd()
        self.processes = ProcessTable()
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp

            # A fresh connection per check: the check proves new connections are accepted.
            conn = aiohttp.TCPConnector(limit=self.concurrency, force_close=True, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=conn, headers={"User-Agent": "charter-supervisor"},
                                                  trust_env=False)
        return self._session

    def path(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else self.base_dir / q

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- command lines for launchd and systemd (also used by the launchers and the tests' golden files)


def launchd_domain(domain: str | None = None, uid: int | None = None) -> str:
    """The launchd domain target: `system`, or `gui/UID` / `user/UID` (the default is this user's GUI
    session, where LaunchAgents live). Spec validation refuses anything else (`specs.LAUNCHD_DOMAIN`)."""
    uid = os.getuid() if uid is None else uid
    if not domain or domain == "gui":
        return f"gui/{uid}"
    if domain == "user":
        return f"user/{uid}"
    return domain


def launchd_print_argv(label: str, domain: str | None = None, uid: int | None = None) -> list[str]:
    """`launchctl print DOMAIN/LABEL`. Not `launchctl list LABEL`, which only sees the caller's own
    domain: a LaunchDaemon (domain `system`) would always read as not loaded."""
    return ["launchctl", "print", f"{launchd_domain(domain, uid)}/{label}"]


def systemd_show_argv(unit: str, scope: str = "user") -> list[str]:
    return ["systemctl", *(["--user"] if scope == "user" else []), "show", unit,
            "--property=LoadState,ActiveState,SubState,MainPID,Result,NRestarts"]


_PRINT_LINE = re.compile(r"^\s*([a-z][a-z ]*?)\s+=\s+(.*?)\s*$")
_LEADING_INT = re.compile(r"^(-?\d+)")


def parse_launchctl_print(text: str) -> dict[str, Any]:
    """`state`, `pid`, `runs`, `last_exit_code` and `last_signal` from `launchctl print DOMAIN/LABEL`.

    Only the service's own top-level keys count: nested blocks (`endpoints`, `event channels`...)
    have `state = active` lines of their own. `last exit code` reads `0`, `78: EX_CONFIG` or
    `(never exited)` (None); a kill shows as `last terminating signal = Killed: 9`.
    """
    info: dict[str, Any] = {"state": None, "pid": None, "runs": None, "last_exit_code": None, "last_signal": None}
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    top = 1 if first.rstrip().endswith("{") else 0  # `gui/501/LABEL = {` ... `}` around the keys
    depth = 0
    for line in lines:
        stripped = line.strip()
        if stripped == "}":
            depth -= 1
            continue
        opens = stripped.endswith("{")
        if depth == top and not opens:
            m = _PRINT_LINE.match(stripped)
            if m:
                key, value = m.group(1), m.group(2)
                number = _LEADING_INT.match(value)
                if key == "state":
                    info["state"] = value
                elif key in ("pid", "runs") and number:
                    info[key] = int(number.group(1))
                elif key == "last exit code":
                    info["last_exit_code"] = int(number.group(1)) if number else None
                elif key == "last terminating signal":
                    sig = re.search(r"(\d+)\s*$", value)
                    info["last_signal"] = int(sig.group(1)) if sig else None
        if opens:
            depth += 1
    return info


def parse_systemctl_show(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


async def run_argv(argv: list[str], timeout: float, *, shell: bool = False, cwd: str | None = None
                   ) -> tuple[int, str]:
    """Run a program, capture stdout+stderr (last 4 KiB), kill it if it overruns. (returncode, output)."""
    if shell:
        proc = await asyncio.create_subprocess_shell(
            " ".join(argv), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=cwd)
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=cwd)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        waiter = asyncio.ensure_future(proc.wait())
        await asyncio.wait({waiter}, timeout=2)
        if not waiter.done():
            waiter.cancel()
        raise
    return proc.returncode if proc.returncode is not None else -1, out[-4096:].decode(errors="replace")


# -- the checks ------------------------------------------------------------------------------------


async def check_launchd(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None
    label = svc.launchd_label()
    argv = launchd_print_argv(label, c.domain)
    try:
        rc, out = await run_argv(argv, svc.timeout)
    except FileNotFoundError:
        return CheckResult(False, "launchctl is not available on this machine (launchd is macOS only)")
    if rc != 0:
        return CheckResult(False, f"{argv[-1]} is not loaded in launchd (`launchctl print` exit {rc}: "
                                  f"{out.strip()[-200:]})")
    return launchd_result(parse_launchctl_print(out), running=c.running is not False)


def launchd_result(info: dict[str, Any], *, running: bool = True) -> CheckResult:
    """What `launchctl print` says means: a PID (a KeepAlive job), or for a periodic job (`running =
    false`) a last run that exited 0 (or none yet)."""
    code, sig = info["last_exit_code"], info["last_signal"]
    last = f"signal {sig}" if sig is not None else ("never exited" if code is None else f"exit code {code}")
    data = {"pid": info["pid"], "state": info["state"], "last_exit_code": code, "last_signal": sig, "runs": info["runs"]}
    if not running:
        ok = sig is None and not code
        return CheckResult(ok, f"loaded; last run: {last}", data=data)
    if info["pid"] is not None:
        return CheckResult(True, f"running, pid {info['pid']}", data=data)
    return CheckResult(False, f"loaded but not running (state {info['state'] or 'unknown'}, last {last})", data=data)


async def check_systemd(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None
    unit, scope = svc.systemd_unit(), svc.systemd_scope()
    try:
        rc, out = await run_argv(systemd_show_argv(unit, scope), svc.timeout)
    except FileNotFoundError:
        return CheckResult(False, "systemctl is not available on this machine")
    if rc != 0:
        return CheckResult(False, f"systemctl show {unit} failed (exit {rc}): {out.strip()[-200:]}")
    info = parse_systemctl_show(out)
    data = {k: info.get(k) for k in ("ActiveState", "SubState", "MainPID", "Result", "NRestarts")}
    if info.get("LoadState") == "not-found":
        return CheckResult(False, f"unit {unit} is not found", data=data)
    states = c.states or ["active"]
    active = info.get("ActiveState", "")
    ok = active in states
    return CheckResult(ok, f"{unit} is {active} ({info.get('SubState', '')})" + ("" if ok else f", result {info.get('Result')}"),
                       data=data)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def check_process(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None
    if c.pidfile:
        path = ctx.path(c.pidfile)
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return CheckResult(False, f"no readable pid in {path}")
        if not _alive(pid):
            return CheckResult(False, f"pid {pid} (from {path.name}) is not running", data={"pid": pid})
        if c.name or c.cmdline:
            try:
                p = psutil.Process(pid)
                if c.name and p.name() != c.name or c.cmdline and c.cmdline not in " ".join(p.cmdline()):
                    return CheckResult(False, f"pid {pid} is running but is not {c.name or c.cmdline!r}", data={"pid": pid})
            except psutil.Error:
                return CheckResult(False, f"pid {pid} vanished", data={"pid": pid})
        return CheckResult(True, f"pid {pid} is running", data={"pid": pid})
    rows = await ctx.processes.rows()
    pids = [pid for pid, name, cmd in rows
            if (c.name is None or name == c.name) and (c.cmdline is None or c.cmdline in cmd)]
    need = c.min_count or 1
    what = " and ".join(x for x in (c.name and f"named {c.name!r}", c.cmdline and f"with {c.cmdline!r} in the command line") if x)
    ok = len(pids) >= need
    return CheckResult(ok, f"{len(pids)} process(es) {what}" + ("" if ok else f"; need {need}"), data={"pids": pids[:20]})


async def check_tcp(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None
    host, port = c.host or "127.0.0.1", c.port or svc.port
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return CheckResult(False, f"{host}:{port} refused or unreachable: {exc.strerror or exc}")
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return CheckResult(True, f"{host}:{port} accepts connections")


def json_path(doc: Any, path: str) -> tuple[bool, Any]:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


async def check_http(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    import aiohttp

    c = svc.check
    assert c is not None and c.url is not None
    url = c.url.replace("{port}", str(svc.port)) if "{port}" in c.url else c.url
    try:
        async with ctx.session().request(c.method or "GET", url, headers=c.headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=svc.timeout)) as r:
            status = r.status
            need_body = c.body_contains is not None or c.json_field is not None
            body = await r.content.read(MAX_BODY) if need_body else b""
    except (aiohttp.ClientError, OSError) as exc:
        return CheckResult(False, f"{url}: {type(exc).__name__}: {exc}"[:300])
    data: dict[str, Any] = {"status": status}
    wanted = c.status
    if wanted is None:
        ok = 200 <= status < 400
    else:
        ok = status in (wanted if isinstance(wanted, list) else [wanted])
    if not ok:
        return CheckResult(False, f"HTTP {status} from {url}" + ("" if wanted is None else f" (expected {wanted})"), data=data)
    if c.body_contains is not None:
        if c.body_contains.encode() not in body:
            return CheckResult(False, f"HTTP {status} but the body does not contain {c.body_contains!r}", data=data)
    if c.json_field is not None:
        try:
            doc = json.loads(body)
        except ValueError:
            return CheckResult(False, f"HTTP {status} but the body is not JSON", data=data)
        found, value = json_path(doc, c.json_field)
        data["json_value"] = value
        if not found:
            return CheckResult(False, f"HTTP {status} but the JSON has no {c.json_field!r}", data=data)
        if c.json_equals is not None and value != c.json_equals:
            return CheckResult(False, f"{c.json_field} is {value!r}, expected {c.json_equals!r}", data=data)
        if c.json_equals is None and not value:
            return CheckResult(False, f"{c.json_field} is {value!r}", data=data)
    return CheckResult(True, f"HTTP {status}", data=data)


async def check_command(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None and c.command is not None
    try:
        rc, out = await run_argv(c.command, svc.timeout, shell=bool(c.shell), cwd=svc.cwd)
    except FileNotFoundError:
        return CheckResult(False, f"command not found: {c.command[0]}")
    want = c.exit_code or 0
    tail = out.strip().splitlines()[-1][:200] if out.strip() else ""
    return CheckResult(rc == want, f"exit {rc}" + (f" (expected {want})" if rc != want else "") + (f": {tail}" if tail else ""),
                       data={"exit_code": rc})


async def check_model(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None and c.backend is not None
    router = ctx.router
    if router is None or c.backend not in router.backends:
        return CheckResult(False, f"backend {c.backend!r} is not in this node's gateway")
    probe = await router.probe(c.backend)  # records the outcome on the backend's circuit breaker too
    ok = probe.get("ok") is True
    detail = f"{c.backend}/{probe.get('model')} answered a probe" if ok else \
        f"{c.backend} probe failed: {probe.get('reason') or 'no model to probe (no alias uses this backend)'}"
    return CheckResult(ok, detail, data={"backend": c.backend, "model": probe.get("model"),
                                         "circuit": router.breakers[c.backend].state})


def _as_time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) / (1000 if value > 1e11 else 1)
    if isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if t.tzinfo is None:
            t = t.astimezone()
        return t.timestamp()
    return None


async def check_freshness(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    c = svc.check
    assert c is not None and c.path is not None
    max_age = c.max_age_seconds if c.max_age_seconds is not None else svc.max_age_seconds
    assert max_age is not None
    target = ctx.path(c.path)
    if any(ch in c.path for ch in "*?["):
        matches = [Path(p) for p in globmod.glob(str(target))]
        if not matches:
            return CheckResult(False, f"nothing matches {target}")
        target = max(matches, key=lambda p: p.stat().st_mtime)
    try:
        st = target.stat()
    except OSError:
        return CheckResult(False, f"{target} does not exist")
    when = st.st_mtime
    if c.receipt or c.field:
        try:
            doc = json.loads(target.read_bytes())
        except (OSError, ValueError):
            return CheckResult(False, f"{target} is not JSON")
        found, value = json_path(doc, c.field or "generated_at")
        stamp = _as_time(value) if found else None
        if stamp is None:
            return CheckResult(False, f"{target} has no time in {c.field or 'generated_at'!r}")
        when = stamp
        if c.receipt and isinstance(doc, dict) and doc.get("status") not in (None, "ok"):
            return CheckResult(False, f"the receipt in {target.name} says status {doc.get('status')!r}")
    age = time.time() - when
    ok = age <= max_age
    return CheckResult(ok, f"{target.name} is {age:.0f}s old" + ("" if ok else f" (max {max_age:g}s)"),
                       data={"age_s": round(age, 1), "path": str(target)})


KINDS = {
    "launchd": check_launchd, "systemd": check_systemd, "process": check_process, "tcp": check_tcp,
    "http": check_http, "command": check_command, "model": check_model, "freshness": check_freshness,
}


async def run_check(svc: ServiceConfig, ctx: CheckContext) -> CheckResult:
    """Run the service's check under its timeout; any failure becomes a failed result with its reason."""
    assert svc.check is not None
    started = time.perf_counter()
    try:
        async with asyncio.timeout(svc.timeout):
            result = await KINDS[svc.check.kind](svc, ctx)
    except TimeoutError:
        result = CheckResult(False, f"the {svc.check.kind} check timed out after {svc.timeout:g}s")
    except Exception as exc:  # noqa: BLE001 - a check's bug is that check's failure, not the supervisor's
        result = CheckResult(False, f"the {svc.check.kind} check raised {type(exc).__name__}: {exc}"[:300])
    result.ms = (time.perf_counter() - started) * 1000
    return result

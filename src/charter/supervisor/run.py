"""`charter run AGENT -- CMD...`: an enrolled agent's process, started inside its sandbox.

* The agent must be enrolled here and live (not suspended, revoked or expired), and its credentials
  must be its own (same agent id; a charter signed by this home's root key).
* Working directory: the agent's sandbox. HOME is the sandbox too, TMPDIR a `.tmp` inside it.
* Environment: scrubbed. Only PATH, LANG/LC_ALL/TERM/TZ (when set), and CHARTER_CREDS (the
  credentials file), CHARTER_AGENT, CHARTER_AGENT_ID, CHARTER_SANDBOX, CHARTER_SERVER reach the
  process, plus what `--env K=V` adds explicitly. No API key or token of the operator leaks in.
* Resource limits, set with setrlimit between fork and exec: CPU seconds (SIGXCPU, then SIGKILL),
  address space (memory), open files, the largest file it may write (the sandbox quota), no core files.
* Jail: where bubblewrap (`bwrap`) is installed, the process runs in new PID, IPC and UTS namespaces
  with the whole file system mounted read-only, CHARTER_HOME hidden under an empty tmpfs (no root
  key, no database, no other sandbox), and only its own sandbox mounted writable (the credentials
  file read-only). `jail = "always"` refuses to run without bwrap; `"never"` does not use it.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.errors import CharterError

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_THROUGH = ("LANG", "LC_ALL", "TERM", "TZ")


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int
    memory_bytes: int
    open_files: int
    file_bytes: int | None = None  # RLIMIT_FSIZE: the sandbox quota

    def to_dict(self) -> dict[str, Any]:
        return {"cpu_seconds": self.cpu_seconds, "memory_bytes": self.memory_bytes, "open_files": self.open_files,
                "file_bytes": self.file_bytes}


def _clamp(kind: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    _, cur_hard = resource.getrlimit(kind)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    return soft, hard


def limit_setter(limits: Limits) -> Callable[[], None]:
    """The preexec function: runs in the child between fork and exec (so only the child is limited)."""
    cpu = _clamp(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5)
    mem = _clamp(resource.RLIMIT_AS, limits.memory_bytes)
    files = _clamp(resource.RLIMIT_NOFILE, limits.open_files)
    fsize = _clamp(resource.RLIMIT_FSIZE, limits.file_bytes) if limits.file_bytes else None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, cpu)
        resource.setrlimit(resource.RLIMIT_AS, mem)
        resource.setrlimit(resource.RLIMIT_NOFILE, files)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, fsize)

    return apply


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def bwrap_problem(bwrap: str) -> str | None:
    """None if bubblewrap can build a jail here; else its complaint (e.g. user namespaces are disabled)."""
    try:
        done = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
                               "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def jail_argv(bwrap: str, sandbox: Path, creds: Path, hide: list[Path], cmd: list[str], *, network: bool = True) -> list[str]:
    """bubblewrap: everything read-only, `hide` under an empty read-only tmpfs, only `sandbox` writable."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for h in hide:
        argv += ["--tmpfs", str(h)]
    argv += ["--bind", str(sandbox), str(sandbox), "--ro-bind", str(creds), str(creds)]
    for h in hide:  # the empty tmpfs itself is read-only too: nothing writable but the sandbox
        argv += ["--remount-ro", str(h)]
    if not network:
        argv.append("--unshare-net")
    argv += ["--chdir", str(sandbox), "--", *cmd]
    return argv


def scrubbed_env(*, sandbox: Path, creds: Path, agent_id: str, name: str, server: str,
                 extra: dict[str, str] | None = None, source: dict[str, str] | None = None) -> dict[str, str]:
    src = os.environ if source is None else source
    venv_bin = str(Path(sys.executable).parent)
    env = {k: src[k] for k in PASS_THROUGH if k in src}
    env.update({
        "PATH": f"{venv_bin}:{SAFE_PATH}",
        "HOME": str(sandbox),
        "TMPDIR": str(sandbox / ".tmp"),
        "CHARTER_CREDS": str(creds),
        "CHARTER_AGENT": name,
        "CHARTER_AGENT_ID": agent_id,
        "CHARTER_SANDBOX": str(sandbox),
        "CHARTER_SERVER": server,
    })
    env.update(extra or {})
    return env


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    limits: Limits
    jailed: bool
    agent: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"argv": self.argv, "cwd": str(self.cwd), "jailed": self.jailed, "limits": self.limits.to_dict(),
                "env": sorted(self.env), **self.agent}


def find_credentials(name: str, home_root: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    for candidate in (Path(f"{name}.creds.json"), home_root / "agents" / f"{name}.creds.json"):
        if candidate.exists():
            return candidate
    raise CharterError("not_found", f"no credentials for {name}: give --creds FILE (looked for ./{name}.creds.json "
                       f"and {home_root / 'agents' / (name + '.creds.json')})", "creds")


def prepare(home: Any, agent_ref: str, cmd: list[str], *, creds: Path | None = None, limits: Limits,
            jail: str = "auto", network: bool = True, extra_env: dict[str, str] | None = None) -> Prepared:
    """Everything checked and decided before anything runs."""
    from charter.identity.registry import ACTIVE, now_ms
    from charter.identity.store import open_registry
    from charter.sdk.credentials import Credentials

    if not cmd:
        raise CharterError("bad_request", "give the command after --, e.g. charter run alpha -- python agent.py", "cmd")
    if not home.db_path.exists():
        raise CharterError("not_initialised", f"{home.root} has no database; run `charter init`", str(home.root))
    registry = open_registry(home, home.load_config(), listen=False)
    try:
        rec = registry.find(agent_ref)
    finally:
        registry.close()
    if rec.status != ACTIVE:
        raise CharterError(rec.status, f"agent {rec.name} is {rec.status}" + (f" ({rec.reason})" if rec.reason else ""), "agent")
    if now_ms() >= rec.expires_at:
        raise CharterError("expired", f"agent {rec.name}'s charter has expired; renew it first", "agent")
    path = find_credentials(rec.name, home.root, creds).resolve()
    c = Credentials.load(path)
    c.check()
    if c.agent_id != rec.id:
        raise CharterError("unauthorized", f"{path} holds the credentials of {c.name} ({c.agent_id}), not {rec.name}", "creds")
    from charter.identity.keys import SigningKey

    root = SigningKey.load_pem(home.root_key_path).public.b64
    if c.root_public_key != root:
        raise CharterError("unauthorized", f"{path} was issued by another Charter home", "creds")
    sandbox = Path(rec.charter.get("sandbox", {}).get("path") or home.sandboxes_dir / rec.id).resolve()
    if not sandbox.is_dir():
        raise CharterError("not_found", f"the sandbox {sandbox} does not exist on this machine", "sandbox")
    (sandbox / ".tmp").mkdir(mode=0o700, exist_ok=True)
    quota = int(rec.charter.get("sandbox", {}).get("quota_bytes") or 0)
    limits = Limits(limits.cpu_seconds, limits.memory_bytes, limits.open_files, limits.file_bytes or (quota or None))
    env = scrubbed_env(sandbox=sandbox, creds=path, agent_id=rec.id, name=rec.name, server=c.server, extra=extra_env)
    bwrap = bwrap_path() if jail != "never" else None
    problem = bwrap_problem(bwrap) if bwrap else "bubblewrap (bwrap) is not installed"
    if problem and jail == "always":
        raise CharterError("unavailable", f"jail = always, but no jail can be built here: {problem}; "
                           "install bubblewrap (apt-get install bubblewrap) or use --jail auto", "jail")
    if problem:
        bwrap = None
    argv = list(cmd)
    if bwrap is not None:
        hide = [home.root.resolve()]
        argv = jail_argv(bwrap, sandbox, path, hide, cmd, network=network)
    return Prepared(argv, env, sandbox, limits, bwrap is not None,
                    {"agent": rec.name, "agent_id": rec.id, "sandbox": str(sandbox), "credentials": str(path),
                     "jail_problem": problem if jail != "never" else None})


def launch(p: Prepared) -> int:
    """Run it in the foreground and return its exit code (128 + N for a signal N, as a shell does)."""
    try:
        proc = subprocess.Popen(p.argv, cwd=p.cwd, env=p.env, stdin=None, preexec_fn=limit_setter(p.limits),  # noqa: PLW1509
                                close_fds=True)
    except FileNotFoundError:
        raise CharterError("not_found", f"command not found: {p.argv[0]}", "cmd") from None
    forward = {}

    def relay(sig: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        forward[sig] = signal.signal(sig, relay)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                relay(signal.SIGINT, None)
    finally:
        for sig, old in forward.items():
            signal.signal(sig, old)
    return 128 - code if code < 0 else code

"""Where and how the proxy starts a downstream MCP server: as the agent, in its sandbox.

With the Charter home on this machine (`CHARTER_HOME`, or `~/.charter`), the downstream runs through the
supervisor's `charter run` machinery (`charter.supervisor.run.prepare`): the agent must be enrolled
here and live, and its credentials its own; the working directory and `HOME` are its sandbox, `TMPDIR`
a `.tmp` inside it; the environment is scrubbed (PATH, LANG/LC_ALL/TERM/TZ, the `CHARTER_*` names of
the agent, plus only what `--env` and `--pass-env` add); resource limits from `[supervisor]`
(`run_cpu`, `run_memory`, `run_files`, the sandbox quota as the largest file) are set before exec by
this module's `__main__`; and where bubblewrap works (`run_jail`), the process is jailed with only its
sandbox writable and the Charter home hidden.

Without a home here (the proxy on another machine than the daemon), it falls back to the sandbox
directory as working directory and the same kind of scrubbed environment, without limits or jail, and
says so on stderr. In both cases the SDK's stdio transport starts the process in its own process group
and adds its short list of safe variables (`HOME`, `LOGNAME`, `PATH`, `SHELL`, `TERM`, `USER`) under
ours; our `HOME` and `PATH` win.

    python -m charter.mcp.launch '{"cpu_seconds": ...}' -- ARGV...   # set the limits, then exec ARGV
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from charter.errors import BAD_REQUEST, NOT_FOUND, CharterError

KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "TERM")


def _note(message: str) -> None:
    print(f"charter mcp proxy: {message}", file=sys.stderr, flush=True)


def sandbox_dir(charter: Mapping[str, Any]) -> Path:
    path = Path(str((charter.get("sandbox") or {}).get("path", "")))
    if not str(path) or not path.is_dir():
        raise CharterError(NOT_FOUND, f"the agent's sandbox {path} is not on this machine: run the proxy where "
                           "the Charter daemon runs", "sandbox")
    return path


def scrubbed_env(charter: Mapping[str, Any], sandbox: Path, extra: Mapping[str, str],
                 environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in KEEP if k in environ}
    tmp = sandbox / ".tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    env.update(HOME=str(sandbox), TMPDIR=str(tmp), CHARTER_AGENT_ID=str(charter.get("agent_id", "")),
               CHARTER_AGENT=str(charter.get("name", "")), CHARTER_SANDBOX=str(sandbox))
    env.update(extra)
    return env


def parse_env(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CharterError(BAD_REQUEST, f"--env takes NAME=VALUE, not {item!r}", "env")
        out[name] = value
    return out


def local_home() -> Any:
    """This machine's Charter home, if it has one (the daemon's side); else None."""
    from charter.config import Home

    home = Home.resolve()
    return home if home.db_path.exists() and home.root_key_path.exists() else None


def stdio_params(creds: str | Path, charter: Mapping[str, Any], command: list[str], *, pass_env: Iterable[str] = (),
                 set_env: Mapping[str, str] | None = None, home: Any = None,
                 note: Callable[[str], None] = _note) -> Any:
    """`StdioServerParameters` that start the downstream `command` as the agent (see the module's doc)."""
    from mcp import StdioServerParameters

    if not command:
        raise CharterError(BAD_REQUEST, "name the downstream server's command after `--`, or give --url", "command")
    extra = {k: os.environ[k] for k in pass_env if k in os.environ}
    extra.update(set_env or {})
    home = home if home is not None else local_home()
    if home is not None:
        from charter.supervisor.run import Limits, prepare

        cfg = home.load_config().supervisor
        p = prepare(home, str(charter["agent_id"]), list(command), creds=Path(creds).resolve(),
                    limits=Limits(int(cfg.run_cpu), int(cfg.run_memory), int(cfg.run_files)),
                    jail=cfg.run_jail, extra_env=extra)
        if not p.jailed:
            note(f"no jail ({p.agent.get('jail_problem')}): the downstream runs with the resource limits and its "
                 "sandbox as working directory only")
        return StdioServerParameters(command=sys.executable,
                                     args=["-m", "charter.mcp.launch", json.dumps(p.limits.to_dict()), "--", *p.argv],
                                     env=p.env, cwd=p.cwd)
    note("no Charter home on this machine (CHARTER_HOME): the downstream runs in the agent's sandbox with a "
         "scrubbed environment, without the supervisor's resource limits or jail")
    sandbox = sandbox_dir(charter)
    return StdioServerParameters(command=command[0], args=list(command[1:]), cwd=sandbox,
                                 env=scrubbed_env(charter, sandbox, extra))


def _exec(argv: list[str]) -> None:
    """Set the resource limits given as JSON, then become the command (no process left in between)."""
    from charter.supervisor.run import Limits, limit_setter

    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m charter.mcp.launch LIMITS_JSON -- COMMAND...")
    limit_setter(Limits(**json.loads(argv[0])))()
    try:
        os.execvp(argv[2], argv[2:])
    except OSError as exc:
        raise SystemExit(f"cannot start {argv[2]}: {exc}") from None


if __name__ == "__main__":
    _exec(sys.argv[1:])

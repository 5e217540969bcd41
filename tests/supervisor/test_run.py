"""`charter run AGENT -- CMD`: an enrolled agent's process in its sandbox, with a scrubbed environment,
resource limits that hold, and (with bubblewrap) a jail in which only its sandbox is writable.

Tests that need bubblewrap skip with the reason when `bwrap` is missing, and fail under CI=true,
where the project's set-up (`make install`, as root) must have installed it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from charter.server.daemon import stop
from charter.supervisor.run import bwrap_problem
from tests.conftest import Daemon, make_home, start_daemon

pytestmark = pytest.mark.slow
PY = sys.executable


def require_bwrap() -> None:
    bwrap = shutil.which("bwrap")
    problem = bwrap_problem(bwrap) if bwrap else "bubblewrap (bwrap) is not installed; `make install` installs it as root"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI must provide a working bubblewrap)")
        pytest.skip(problem)


class Env:
    def __init__(self, daemon: Daemon, creds: Path, agent_id: str, outside: Path) -> None:
        self.daemon, self.creds, self.agent_id, self.outside = daemon, creds, agent_id, outside
        self.home = daemon.home
        self.sandbox = (self.home.sandboxes_dir / agent_id).resolve()

    def run(self, code: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [PY, "-m", "charter", "--home", str(self.home.root), "run", "alpha", "--creds", str(self.creds),
                *flags, "--", PY, "-c", code]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CHARTER_TEST_SECRET": "hunter2", **(env or {})})


@pytest.fixture(scope="module")
def agent_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import asyncio

    root = tmp_path_factory.mktemp("run")
    home = make_home(root / "home")
    d = start_daemon(home)
    outside = root / "outside"
    outside.mkdir()

    async def enroll() -> Any:
        agent = await d.enroll("alpha", creds_dir=root)
        await agent.close()
        return agent

    agent = asyncio.run(enroll())
    try:
        yield Env(d, root / "alpha.creds.json", agent.id, outside)
    finally:
        stop(home)


PROBE = """
import json, os, pathlib, sys
def attempt(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return "written"
    except OSError as exc:
        return exc.strerror
home = sys.argv[1] if len(sys.argv) > 1 else os.environ["PROBE_HOME"]
out = {
    "cwd": os.getcwd(), "home": os.environ.get("HOME"), "tmpdir": os.environ.get("TMPDIR"),
    "secret": os.environ.get("CHARTER_TEST_SECRET"), "env": sorted(os.environ),
    "creds_name": json.load(open(os.environ["CHARTER_CREDS"]))["name"],
    "inside": attempt("inside.txt"),
    "tmp_inside": attempt(os.path.join(os.environ["TMPDIR"], "t")),
    "outside": attempt(os.environ["PROBE_OUTSIDE"] + "/escaped.txt") if os.environ.get("PROBE_JAILED") else None,
    "config": attempt(home + "/charter.toml") if os.environ.get("PROBE_JAILED") else None,
    "root_key_visible": os.path.exists(home + "/keys/root.key"),
    "db_visible": os.path.exists(home + "/charter.db"),
    "etc": attempt("/etc/charter-escape") if os.environ.get("PROBE_JAILED") else None,
    "pid": os.getpid(),
}
print(json.dumps(out))
"""


def probe(env: Env, *flags: str) -> dict[str, Any]:
    jailed = ["--env", "PROBE_JAILED=1"] if "never" not in flags else []
    done = env.run(PROBE, *flags, "--env", f"PROBE_HOME={env.home.root}", "--env", f"PROBE_OUTSIDE={env.outside}", *jailed)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_jailed_agent_cannot_write_outside_its_sandbox(agent_env: Env) -> None:
    require_bwrap()
    r = probe(agent_env)
    assert r["cwd"] == str(agent_env.sandbox) and r["home"] == str(agent_env.sandbox)
    assert r["inside"] == "written" and (agent_env.sandbox / "inside.txt").read_text() == "x"
    assert r["tmp_inside"] == "written" and r["tmpdir"] == str(agent_env.sandbox / ".tmp")
    assert r["outside"] == "Read-only file system" and not (agent_env.outside / "escaped.txt").exists()
    assert r["etc"] == "Read-only file system" and not Path("/etc/charter-escape").exists()
    assert not r["root_key_visible"] and not r["db_visible"]  # CHARTER_HOME is hidden: no root key to steal
    assert r["config"] == "Read-only file system" and agent_env.home.config_path.read_text() != "x"
    assert r["pid"] < 10  # its own PID namespace
    assert r["secret"] is None and r["creds_name"] == "alpha"  # scrubbed environment, its own credentials
    assert set(r["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TERM", "TZ", "CHARTER_CREDS", "CHARTER_AGENT",
                             "CHARTER_AGENT_ID", "CHARTER_SANDBOX", "CHARTER_SERVER", "PROBE_HOME", "PROBE_OUTSIDE", "PROBE_JAILED", "PWD",
                             "LC_CTYPE"}


CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    print("connected")
except OSError as exc:
    print("cut", exc.errno)
"""


def test_no_network_jail_cannot_reach_a_server_on_the_host(agent_env: Env) -> None:
    """`--no-network`: the jailed command cannot connect to a TCP server the test runs on 127.0.0.1 (its
    loopback is its own), while the same command with the network reaches it."""
    require_bwrap()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        argv = [PY, "-c", CONNECT, str(port)]
        base = [PY, "-m", "charter", "--home", str(agent_env.home.root), "run", "alpha", "--creds", str(agent_env.creds)]
        cut = subprocess.run([*base, "--no-network", "--", *argv], capture_output=True, text=True, timeout=60)
        assert cut.returncode == 0, cut.stderr
        assert cut.stdout.startswith("cut "), cut.stdout
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing arrived from the jail
        kept = subprocess.run([*base, "--", *argv], capture_output=True, text=True, timeout=60)
        assert kept.returncode == 0 and kept.stdout.strip() == "connected", kept.stdout + kept.stderr
        conn, _ = server.accept()  # the one connection, from the run with the network
        conn.close()
    plan = json.loads(subprocess.run([*base, "--no-network", "--dry-run", "--", *argv], capture_output=True, text=True,
                                     timeout=60).stdout)
    assert plan["jailed"] and "--unshare-net" in plan["argv"]


def test_without_a_jail_the_sandbox_environment_and_limits_still_apply(agent_env: Env) -> None:
    r = probe(agent_env, "--jail", "never")
    assert r["cwd"] == str(agent_env.sandbox) and r["secret"] is None and r["creds_name"] == "alpha"
    assert r["inside"] == "written" and r["root_key_visible"]  # no jail: nothing is hidden (only writes probed inside)


@pytest.mark.parametrize("jail", ["auto", "never"])
def test_memory_limit_holds(agent_env: Env, jail: str) -> None:
    if jail == "auto":
        require_bwrap()
    big = agent_env.run("b = bytearray(1 << 30); print(len(b))", "--memory", "256MiB", "--jail", jail)
    assert big.returncode == 1 and "MemoryError" in big.stderr
    small = agent_env.run("b = bytearray(16 << 20); print(len(b))", "--memory", "256MiB", "--jail", jail)
    assert small.returncode == 0 and small.stdout.strip() == str(16 << 20)


@pytest.mark.parametrize("jail", ["auto", "never"])
def test_open_file_limit_holds(agent_env: Env, jail: str) -> None:
    if jail == "auto":
        require_bwrap()
    code = """
import errno, resource, sys
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
files = []
try:
    for i in range(200):
        files.append(open(f"f{i}.txt", "w"))
except OSError as exc:
    print(len(files), errno.errorcode[exc.errno])
    sys.exit(3)
"""
    done = agent_env.run(code, "--files", "32", "--jail", jail)
    assert done.returncode == 3, done.stderr
    limit, line = done.stdout.strip().splitlines()
    opened, err = line.split()
    assert int(limit) == 32 and err == "EMFILE" and 20 <= int(opened) < 32


def test_cpu_limit_holds(agent_env: Env) -> None:
    done = agent_env.run("while True: pass", "--cpu", "1s", "--jail", "never")
    assert done.returncode == 128 + 24  # SIGXCPU


def test_refused_for_a_suspended_agent_and_a_stranger(agent_env: Env, tmp_path: Path) -> None:
    import asyncio

    asyncio.run(agent_env.daemon.admin("POST", "/v1/admin/agents/alpha/suspend", json={"reason": "test"}))
    try:
        done = agent_env.run("print('ran')")
        assert done.returncode == 4 and "suspended" in done.stderr and "ran" not in done.stdout
    finally:
        asyncio.run(agent_env.daemon.admin("POST", "/v1/admin/agents/alpha/resume", json={}))
    missing = subprocess.run([PY, "-m", "charter", "--home", str(agent_env.home.root), "run", "nobody", "--", "true"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 4 and "not_found" in missing.stderr
    no_cmd = subprocess.run([PY, "-m", "charter", "--home", str(agent_env.home.root), "run", "alpha", "--creds",
                             str(agent_env.creds)], capture_output=True, text=True, timeout=60)
    assert no_cmd.returncode == 2 and "give the command after --" in no_cmd.stderr


def test_dry_run_shows_the_jail_and_no_secret_values(agent_env: Env) -> None:
    done = agent_env.run("print(1)", "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["agent"] == "alpha" and plan["cwd"] == str(agent_env.sandbox)
    assert "CHARTER_CREDS" in plan["env"] and "hunter2" not in done.stdout
    assert plan["limits"]["file_bytes"] == 256 * 2**20  # the sandbox quota of the worker role
    if plan["jailed"]:
        argv = plan["argv"]
        assert argv[0].endswith("bwrap") and "--unshare-pid" in argv
        assert argv[argv.index("--tmpfs") + 1] == str(agent_env.home.root.resolve())
        assert ["--bind", str(agent_env.sandbox), str(agent_env.sandbox)] == argv[argv.index("--bind"):argv.index("--bind") + 3]

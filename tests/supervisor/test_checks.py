"""Each check kind against real things: sockets, HTTP servers, processes, programs, files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from charter.supervisor.checks import (
    CheckContext,
    launchd_print_argv,
    launchd_result,
    parse_launchctl_print,
    parse_systemctl_show,
    run_check,
)
from charter.errors import ConfigError
from charter.supervisor.specs import parse_service
from tests.supervisor.conftest import PY, Started, free_port, wait_port

pytestmark = pytest.mark.anyio

LAUNCHCTL = Path(__file__).with_name("golden") / "launchctl"


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[CheckContext]:
    c = CheckContext(base_dir=tmp_path)
    yield c
    await c.close()


async def check(ctx: CheckContext, check: dict, **svc: object):  # noqa: ANN201
    return await run_check(parse_service({"label": "ai.test.x", "check": check, **svc}, "test"), ctx)


async def test_tcp(ctx: CheckContext) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = await check(ctx, {"kind": "tcp", "port": port})
        assert r.ok and r.ms > 0
    r = await check(ctx, {"kind": "tcp"}, port=port)  # the service's port
    assert not r.ok and "refused" in r.detail


async def test_http_status_body_and_json(ctx: CheckContext, started: Started, tmp_path: Path) -> None:
    port = free_port()
    status = tmp_path / "status"
    status.write_text("200")
    started.svc(port, "--status-file", str(status), "--body", '{"status": "ok", "checks": {"db": {"ok": true}}, "n": [1, 2]}')
    wait_port(port)
    url = f"http://127.0.0.1:{port}/health"
    assert (await check(ctx, {"kind": "http", "url": url})).ok
    assert (await check(ctx, {"kind": "http", "url": "http://127.0.0.1:{port}/"}, port=port)).ok
    assert (await check(ctx, {"kind": "http", "url": url, "json_field": "checks.db.ok"})).ok
    assert (await check(ctx, {"kind": "http", "url": url, "json_field": "n.1", "json_equals": 2})).ok
    r = await check(ctx, {"kind": "http", "url": url, "json_field": "checks.cache"})
    assert not r.ok and "has no 'checks.cache'" in r.detail
    r = await check(ctx, {"kind": "http", "url": url, "body_contains": "healthy"})
    assert not r.ok
    status.write_text("302")
    assert (await check(ctx, {"kind": "http", "url": url})).ok  # 3xx passes by default (not followed)
    r = await check(ctx, {"kind": "http", "url": url, "status": [200, 204]})
    assert not r.ok and "HTTP 302" in r.detail and r.data["status"] == 302
    status.write_text("500")
    r = await check(ctx, {"kind": "http", "url": url})
    assert not r.ok and "HTTP 500" in r.detail
    assert (await check(ctx, {"kind": "http", "url": url, "status": 500})).ok


async def test_http_that_accepts_but_never_answers_times_out(ctx: CheckContext) -> None:
    with socket.socket() as s:  # the kernel completes the handshake; nobody ever reads or writes
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        started = time.monotonic()
        r = await check(ctx, {"kind": "http", "url": f"http://127.0.0.1:{s.getsockname()[1]}/"}, timeout="0.3s")
        assert not r.ok and time.monotonic() - started < 2
        assert "timed out" in r.detail or "Timeout" in r.detail


async def test_process_by_pidfile_name_and_cmdline(ctx: CheckContext, tmp_path: Path) -> None:
    marker = f"charter-test-sleeper-{time.time_ns()}"
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(60)", marker])
    try:
        pidfile = tmp_path / "svc.pid"
        pidfile.write_text(f"{proc.pid}\n")
        assert (await check(ctx, {"kind": "process", "pidfile": "svc.pid"})).ok  # relative to the home
        assert (await check(ctx, {"kind": "process", "cmdline": marker})).ok
        r = await check(ctx, {"kind": "process", "cmdline": marker, "min_count": 2})
        assert not r.ok and "1 process(es)" in r.detail and "need 2" in r.detail
        name = Path(PY).resolve().name
        r = await check(ctx, {"kind": "process", "pidfile": str(pidfile), "name": "definitely-not-" + name})
        assert not r.ok and "is not" in r.detail
        proc.kill()
        proc.wait()
        ctx.processes.ttl = 0
        r = await check(ctx, {"kind": "process", "pidfile": str(pidfile)})
        assert not r.ok and "is not running" in r.detail
        assert not (await check(ctx, {"kind": "process", "cmdline": marker})).ok
        pidfile.write_text("garbage")
        assert "no readable pid" in (await check(ctx, {"kind": "process", "pidfile": str(pidfile)})).detail
    finally:
        proc.kill()
        proc.wait()


async def test_command_exit_code_and_timeout(ctx: CheckContext, tmp_path: Path) -> None:
    assert (await check(ctx, {"kind": "command", "command": [PY, "-c", "print('fine')"]})).ok
    r = await check(ctx, {"kind": "command", "command": [PY, "-c", "import sys; print('disk full'); sys.exit(2)"]})
    assert not r.ok and r.detail == "exit 2 (expected 0): disk full" and r.data["exit_code"] == 2
    assert (await check(ctx, {"kind": "command", "command": "exit 2", "shell": True, "exit_code": 2})).ok
    marker = tmp_path / "survived"
    started = time.monotonic()
    r = await check(ctx, {"kind": "command",
                          "command": [PY, "-c", f"import time; time.sleep(5); open({str(marker)!r}, 'w')"]},
                    timeout="0.3s")
    assert not r.ok and "timed out" in r.detail and time.monotonic() - started < 2
    time.sleep(0.2)
    assert not marker.exists()  # the overrunning program was killed, not left behind
    r = await check(ctx, {"kind": "command", "command": ["/no/such/program"]})
    assert not r.ok and "not found" in r.detail


def launchctl_print(name: str) -> str:
    return (LAUNCHCTL / name).read_text()


def test_launchctl_print_parsing_against_captured_output() -> None:
    """`launchctl print` output (tests/supervisor/golden/launchctl/): only the service's own keys count,
    not the `state = active` of its endpoints; the three shapes of `last exit code`; a kill."""
    agent = parse_launchctl_print(launchctl_print("agent_running.txt"))
    assert agent == {"state": "running", "pid": 4242, "runs": 3, "last_exit_code": None, "last_signal": 15}
    daemon = parse_launchctl_print(launchctl_print("daemon_exited.txt"))
    assert daemon == {"state": "not running", "pid": None, "runs": 12, "last_exit_code": 78, "last_signal": None}
    periodic = parse_launchctl_print(launchctl_print("periodic_ok.txt"))
    assert periodic == {"state": "not running", "pid": None, "runs": 58, "last_exit_code": 0, "last_signal": None}
    killed = parse_launchctl_print(launchctl_print("periodic_killed.txt"))
    assert killed["last_signal"] == 9 and killed["last_exit_code"] is None and killed["pid"] is None
    assert parse_launchctl_print("state = not running\n\tlast exit code = (never exited)\n")["last_exit_code"] is None

    r = launchd_result(agent)
    assert r.ok and r.detail == "running, pid 4242" and r.data["pid"] == 4242
    r = launchd_result(daemon)
    assert not r.ok and r.detail == "loaded but not running (state not running, last exit code 78)"
    assert launchd_result(periodic, running=False).ok
    assert not launchd_result(periodic).ok  # a KeepAlive job needs a PID
    r = launchd_result(killed, running=False)
    assert not r.ok and r.detail == "loaded; last run: signal 9"
    assert not launchd_result(daemon, running=False).ok


def test_launchd_check_commands_follow_the_domain() -> None:
    assert launchd_print_argv("ai.x", None, 501) == ["launchctl", "print", "gui/501/ai.x"]
    assert launchd_print_argv("ai.x", "gui", 501) == ["launchctl", "print", "gui/501/ai.x"]
    assert launchd_print_argv("ai.x", "system", 501) == ["launchctl", "print", "system/ai.x"]
    assert launchd_print_argv("ai.x", "user", 501) == ["launchctl", "print", "user/501/ai.x"]
    assert launchd_print_argv("ai.x", "gui/502", 501) == ["launchctl", "print", "gui/502/ai.x"]
    with pytest.raises(ConfigError, match="domain 'System/0' is not a launchd domain"):
        parse_service({"label": "ai.x.y", "check": {"kind": "launchd", "domain": "System/0"}}, "services/x.toml:")


async def test_launchd_check_runs_launchctl_print_in_the_spec_s_domain(
        ctx: CheckContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """launchctl is not on Linux: a stand-in on PATH records the command the check runs and answers with
    captured output, so what is run, in which domain, and how its answer and exit status are read is real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_log = tmp_path / "argv.log"
    stub = bin_dir / "launchctl"
    stub.write_text(f"""#!/bin/sh
echo "$@" >> {argv_log}
case "$2" in
  system/ai.activemirror.root) cat {LAUNCHCTL / "daemon_exited.txt"} ;;
  gui/*/ai.activemirror.cloudflared) cat {LAUNCHCTL / "agent_running.txt"} ;;
  *) echo "Could not find service \"${{2##*/}}\" in domain for port"; exit 113 ;;
esac
""")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    daemon = parse_service({"label": "ai.activemirror.root", "check": {"kind": "launchd", "domain": "system"}}, "x")
    r = await run_check(daemon, ctx)
    assert not r.ok and "last exit code 78" in r.detail
    agent = parse_service({"label": "ai.activemirror.cloudflared", "check": {"kind": "launchd"}}, "x")
    r = await run_check(agent, ctx)
    assert r.ok and r.data["pid"] == 4242
    r = await run_check(parse_service({"label": "ai.activemirror.gone", "check": {"kind": "launchd"}}, "x"), ctx)
    assert not r.ok and f"gui/{os.getuid()}/ai.activemirror.gone is not loaded" in r.detail and "exit 113" in r.detail
    assert argv_log.read_text().splitlines() == [
        "print system/ai.activemirror.root", f"print gui/{os.getuid()}/ai.activemirror.cloudflared",
        f"print gui/{os.getuid()}/ai.activemirror.gone"]


async def test_launchd_and_systemd_output_parsing(ctx: CheckContext) -> None:
    info = parse_systemctl_show("LoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\nResult=exit-code\n")
    assert info["ActiveState"] == "failed" and info["Result"] == "exit-code"
    if sys.platform != "darwin" and shutil.which("launchctl") is None:
        r = await check(ctx, {"kind": "launchd"})
        assert not r.ok and "launchctl is not available" in r.detail


async def test_model_check_needs_the_gateway(ctx: CheckContext) -> None:
    r = await check(ctx, {"kind": "model", "backend": "ollama"})
    assert not r.ok and "not in this node's gateway" in r.detail

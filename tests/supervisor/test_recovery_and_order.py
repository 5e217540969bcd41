"""Restarts only of what is still down, dependency order at start, the sticky `failed` state, and what a
process Charter runs is given. Real processes, ports and checks; nothing mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from charter.node import Node
from tests.supervisor.conftest import (
    PY,
    SVC,
    Started,
    events,
    free_port,
    kill9,
    kill_leftovers,
    toml_list,
    wait_port,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def unchecked_external(label: str, port: int, backoff: str, ran: Path) -> str:
    """Services TOML: an external service (restarted by a command that leaves `ran` behind) checked on
    `port` once an hour, so nothing but the test and the supervisor's own restart logic checks it."""
    return f"""
[[services]]
label = "{label}"
manager = "command"
interval = "1h"
timeout = "1s"
port = {port}
restart = {{ base = "{backoff}", command = {toml_list(recorder(ran))} }}
check = {{ kind = "tcp" }}
"""


def app_service(dep_label: str, dep_port: int, app_port: int, app_starts: Path) -> str:
    """Services TOML for Charter's own `ai.test.app`, which exits unless `dep_port` answers,
    depending on `dep_label`."""
    command = toml_list([PY, SVC, "--port", str(app_port), "--starts", str(app_starts), "--require-port", str(dep_port)])
    return f"""
[[services]]
label = "ai.test.app"
depends = ["{dep_label}"]
command = {command}
interval = "1s"
retry_interval = "0.1s"
port = {app_port}
restart = {{ base = "0.1s", start_period = "5s" }}
check = {{ kind = "tcp" }}
"""


def app_needing(dep_label: str, dep_port: int, app_port: int, app_starts: Path) -> str:
    """`app_service`, and `dep_label` as an external service checked on `dep_port`."""
    return app_service(dep_label, dep_port, app_port, app_starts) + f"""
[[services]]
label = "{dep_label}"
interval = "0.3s"
retry_interval = "0.2s"
timeout = "0.5s"
port = {dep_port}
check = {{ kind = "tcp" }}
"""


async def restarts_of(node: Node, label: str) -> list[dict]:
    return [e["payload"] for e in await events(node, "charter.services.restarts") if e["payload"]["service"] == label]


async def health_of(node: Node, label: str) -> list[dict]:
    return [e for e in await events(node, "charter.services.health") if e["payload"]["service"] == label]


def recorder(path: Path) -> list[str]:
    """A restart command that only records that it ran."""
    return [PY, "-c", f"open({str(path)!r}, 'a').write('x')"]


async def test_a_pending_restart_is_dropped_when_the_service_passes_again(
        node_factory, started: Started, tmp_path: Path) -> None:
    port = free_port()
    ran = tmp_path / "restart-ran"
    started.svc(port)
    wait_port(port)
    node = await node_factory(unchecked_external("ai.test.back", port, "4s", ran))
    sup = node.supervisor
    svc = sup.services["ai.test.back"]
    await wait_until(lambda: svc.state == "passing")
    kill9(started.procs[0].pid)
    started.procs[0].wait(5)
    down = await sup.check("ai.test.back")
    assert down["state"] == "critical" and down["restart_in_s"] > 2  # a restart is pending, after its backoff
    restart_due = time.monotonic() + down["restart_in_s"]

    started.svc(port)  # it comes back by itself during the backoff ...
    await asyncio.to_thread(wait_port, port)
    back = await sup.check("ai.test.back")  # ... and the operator's check sees it
    assert back["state"] == "passing" and back["restart_in_s"] is None  # the pending restart is gone
    await asyncio.sleep(max(restart_due - time.monotonic(), 0) + 1.0)
    assert not ran.exists(), "a service that passed again was restarted anyway"
    assert svc.state == "passing" and await restarts_of(node, "ai.test.back") == []


async def test_an_automatic_restart_first_checks_that_the_service_is_still_down(
        node_factory, started: Started, tmp_path: Path) -> None:
    """Nobody checks during the backoff (the interval is an hour), but the service came back, e.g. launchd's
    KeepAlive restarted it: the check right before the restart sees it, and a working service is not killed."""
    port = free_port()
    ran = tmp_path / "restart-ran"
    node = await node_factory(unchecked_external("ai.test.keepalive", port, "3s", ran))
    sup = node.supervisor
    svc = sup.services["ai.test.keepalive"]
    await wait_until(lambda: svc.state == "critical")  # nothing listens yet
    assert svc.restart_at is not None and svc.checks == 1
    started.svc(port)
    await asyncio.to_thread(wait_port, port)
    await wait_until(lambda: svc.checks >= 2, timeout=10)  # the check made when the backoff ended
    await sup.flush()
    assert not ran.exists(), "a service that was back was restarted"
    assert svc.state == "passing" and await restarts_of(node, "ai.test.keepalive") == []
    assert [(e["payload"]["previous"], e["payload"]["state"]) for e in await health_of(node, "ai.test.keepalive")] == [
        ("unknown", "critical"), ("critical", "passing")]


async def test_processes_charter_runs_start_in_dependency_order_after_the_dependency_passes(
        node_factory, tmp_path: Path) -> None:
    """The app is declared first and exits at once (code 4) if its database does not answer; the database
    takes 0.8 s to listen. The app starts once, after the database's first passing check."""
    db_port, app_port = free_port(), free_port()
    app_starts, db_starts = tmp_path / "app.starts", tmp_path / "db.starts"
    node = await node_factory(app_service("ai.test.db", db_port, app_port, app_starts) + f"""
[[services]]
label = "ai.test.db"
command = {toml_list([PY, SVC, "--port", str(db_port), "--starts", str(db_starts), "--delay-listen", "0.8"])}
interval = "1s"
retry_interval = "0.1s"
port = {db_port}
restart = {{ start_period = "5s" }}
check = {{ kind = "tcp" }}
""")
    sup = node.supervisor
    app, db = sup.services["ai.test.app"], sup.services["ai.test.db"]
    await wait_until(lambda: app.state == "passing" and db.state == "passing", timeout=15)
    assert len(app_starts.read_text().splitlines()) == 1, "the app started before its database answered"
    assert app.managed.last_exit is None and await restarts_of(node, "ai.test.app") == []
    db_up = [e["seq"] for e in await health_of(node, "ai.test.db") if e["payload"]["state"] == "passing"][0]
    app_moves = await health_of(node, "ai.test.app")
    assert [(e["payload"]["previous"], e["payload"]["state"]) for e in app_moves] == [
        ("unknown", "starting"), ("starting", "passing")]  # neither checked nor failed while it waited
    app_start = app_moves[0]
    assert db_up < app_start["seq"]
    assert "once ai.test.db passed" in app_start["payload"]["reason"]
    db_started = float(db_starts.read_text().split()[1])
    app_started = float(app_starts.read_text().split()[1])
    assert app_started - db_started >= 0.8  # it waited for the database to listen, not just to be spawned


async def test_a_dependent_is_not_started_while_its_dependency_fails_and_starts_when_it_passes(
        node_factory, started: Started, tmp_path: Path) -> None:
    dep_port, app_port = free_port(), free_port()
    app_starts = tmp_path / "app.starts"
    node = await node_factory(app_needing("ai.test.external", dep_port, app_port, app_starts))
    sup = node.supervisor
    app = sup.services["ai.test.app"]
    # Past what the dependency is given (its timeout and one retry, 0.7 s), the app is reported down.
    await wait_until(lambda: app.state == "critical", timeout=5)
    assert "not started: ai.test.external is critical after 0.7s" in app.reason
    await asyncio.sleep(0.5)
    assert app.managed.pid is None and not app_starts.exists() and app.checks == 0
    assert app.view(time.monotonic())["awaiting_start"]

    started.svc(dep_port)
    await wait_until(lambda: app.state == "passing", timeout=10)
    assert len(app_starts.read_text().splitlines()) == 1 and await restarts_of(node, "ai.test.app") == []


async def test_failed_is_left_only_by_the_operator_even_when_a_flapping_service_passes_for_a_while(
        node_factory, started: Started, tmp_path: Path) -> None:
    """An externally managed service that flaps: Charter's restarts reach the start limit, then something
    else (launchd's KeepAlive, here the test) brings it back for a moment. It passes, but it stays
    `failed`, with no fresh burst of restarts; the operator's reset starts the counting over."""
    port = free_port()
    starts = tmp_path / "starts.log"
    marker = f"--starts={starts}"
    flap = [PY, SVC, "--port", str(port), marker, "--exit-after", "0.8"]
    started.svc(port, marker, "--exit-after", "0.8")
    node = await node_factory(f"""
[[services]]
label = "ai.test.flapping"
manager = "command"
interval = "0.2s"
timeout = "1s"
port = {port}
restart = {{ base = "0.1s", cap = "0.1s", start_limit_burst = 2, start_limit_interval = "1m", start_period = "5s", command = {toml_list([*flap, "--detach"])} }}
check = {{ kind = "tcp" }}
""")
    sup = node.supervisor
    svc = sup.services["ai.test.flapping"]
    try:
        await wait_until(lambda: svc.state == "failed", timeout=30)
        assert "start limit reached: 2 restarts" in svc.reason
        assert len(await restarts_of(node, "ai.test.flapping")) == 2

        started.svc(port, marker, "--exit-after", "0.8")  # brought back outside Charter, briefly
        await wait_until(lambda: svc.last.ok, timeout=10)
        view = svc.view(time.monotonic())  # its health shows; the state stays
        assert view["state"] == "failed" and view["last"]["ok"] and "last check passed" in view["reason"]
        await wait_until(lambda: not svc.last.ok, timeout=10)  # ... and it dies again
        await asyncio.sleep(1.0)  # ten backoffs
        assert svc.state == "failed"
        assert len(await restarts_of(node, "ai.test.flapping")) == 2, "a flapping service got a fresh burst"
        assert len(starts.read_text().splitlines()) == 4  # the first run, two restarts, the outside one
        assert [e["payload"]["state"] for e in await health_of(node, "ai.test.flapping")][-1] == "failed"

        reset = await sup.reset("ai.test.flapping")  # the operator's reset-failed: no restart by itself
        assert reset["state"] == "critical" and reset["restart_policy"]["in_window"] == 0
        await wait_until(lambda: len(starts.read_text().splitlines()) == 5, timeout=10)  # automatic restarts again
        # The restart's event is appended once the launcher returns, and the process it started may
        # have written its line before that.
        async def three() -> list[dict]:
            found = await restarts_of(node, "ai.test.flapping")
            return found if len(found) >= 3 else []

        third = (await wait_until(three, timeout=10))[2]
        assert third["automatic"] and third["attempt"] == 1
    finally:
        await sup.close()  # first, or it would restart what is killed next
        kill_leftovers(marker)


async def test_a_managed_process_gets_its_env_and_cwd(node_factory, tmp_path: Path, monkeypatch) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    monkeypatch.setenv("CHARTER_TEST_INHERITED", "from the daemon")
    code = ("import json, os, pathlib, time; pathlib.Path('seen.json').write_text(json.dumps({'cwd': os.getcwd(), "
            "'greeting': os.environ.get('GREETING'), 'path': os.environ.get('PATH'), "
            "'service': os.environ.get('CHARTER_SERVICE'), 'inherited': os.environ.get('CHARTER_TEST_INHERITED')})); "
            "time.sleep(60)")
    node = await node_factory(f"""
[[services]]
label = "ai.test.envcwd"
command = {toml_list([PY, "-c", code])}
cwd = {json.dumps(str(workdir))}
env = {{ GREETING = "hello from the spec", PATH = "/opt/spec/bin:/usr/bin:/bin" }}
interval = "1s"
""")
    svc = node.supervisor.services["ai.test.envcwd"]
    seen_path = workdir / "seen.json"  # written relative to its working directory
    await wait_until(lambda: seen_path.exists() and seen_path.read_text(), timeout=10)
    seen = json.loads(seen_path.read_text())
    assert seen == {"cwd": str(workdir), "greeting": "hello from the spec", "path": "/opt/spec/bin:/usr/bin:/bin",
                    "service": "ai.test.envcwd", "inherited": "from the daemon"}
    assert svc.managed.alive() and os.path.samefile(f"/proc/{svc.managed.pid}/cwd", workdir)


async def test_reload_publishes_the_reset_of_a_changed_service_to_unknown(node_factory) -> None:
    port = free_port()
    node = await node_factory(f"""
[[services]]
label = "ai.test.one"
command = {toml_list([PY, SVC, "--port", str(port)])}
port = {port}
interval = "1s"
check = {{ kind = "tcp" }}
""")
    sup = node.supervisor
    await wait_until(lambda: sup.services["ai.test.one"].state == "passing")
    await sup.stop("ai.test.one")
    from charter.supervisor.specs import load_specs

    text = node.home.config_path.read_text()
    node.home.config_path.write_text(text.replace('interval = "1s"', 'interval = "2s"'))
    changes = await sup.reload(load_specs(node.home, node.home.load_config()))
    assert changes["changed"] == ["ai.test.one"]
    await wait_until(lambda: sup.services["ai.test.one"].state == "passing")
    moves = [(e["payload"]["previous"], e["payload"]["state"]) for e in await health_of(node, "ai.test.one")]
    assert moves[-4:] == [("passing", "stopped"), ("stopped", "unknown"), ("unknown", "starting"),
                          ("starting", "passing")]


async def test_a_dependency_passing_before_the_daemon_restarted_does_not_count(
        sup_home, started: Started, tmp_path: Path) -> None:
    """States are remembered across a daemon's restart, but a dependent waits for a check made in this
    run: the external database's `passing` from before is no proof that it answers now (it does not)."""
    from tests.supervisor.conftest import write_services

    db_port, app_port = free_port(), free_port()
    app_starts = tmp_path / "app.starts"
    write_services(sup_home, app_needing("ai.test.db", db_port, app_port, app_starts))
    db_proc = started.svc(db_port)
    await asyncio.to_thread(wait_port, db_port)
    for run in (1, 2):
        node = Node(sup_home)
        await node.start()
        try:
            sup = node.supervisor
            app, db = sup.services["ai.test.app"], sup.services["ai.test.db"]
            if run == 2:  # db's `passing` is remembered from the first run, but its first check fails
                await wait_until(lambda: db.state == "critical")
                assert app.managed.pid is None and len(app_starts.read_text().splitlines()) == 1
                started.svc(db_port)
            await wait_until(lambda: app.state == "passing" and db.state == "passing", timeout=15)
            assert len(app_starts.read_text().splitlines()) == run and app.restarts == 0
            assert app.managed.last_exit is None
        finally:
            await node.close()
        kill9(db_proc.pid)  # the database goes down while no daemon runs
        db_proc.wait(5)

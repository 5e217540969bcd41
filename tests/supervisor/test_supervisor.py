"""The supervisor in a real Node: real processes killed with SIGKILL, real ports, real HTTP servers.

Intervals are short (a second or less) so that "within one interval" is a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
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


def svc_of(node: Node, label: str):  # noqa: ANN201
    return node.supervisor.services[label]


async def health(node: Node, label: str) -> list[dict]:
    return [e["payload"] for e in await events(node, "charter.services.health") if e["payload"]["service"] == label]


async def test_killed_managed_service_is_restarted_with_growing_backoff(node_factory, tmp_path: Path) -> None:
    port = free_port()
    starts = tmp_path / "starts.log"
    node = await node_factory(f"""
[[services]]
label = "ai.test.web"
why = "a web service Charter runs"
command = {toml_list([PY, SVC, "--port", str(port), "--starts", str(starts)])}
interval = "1s"
retry_interval = "0.1s"
port = {port}
restart = {{ base = "0.3s", cap = "2s", start_limit_burst = 5, start_limit_interval = "1m", start_period = "5s" }}
[services.check]
kind = "http"
url = "http://127.0.0.1:{{port}}/"
json_field = "status"
json_equals = "ok"
""")
    svc = svc_of(node, "ai.test.web")
    await wait_until(lambda: svc.state == "passing")
    for round_ in (1, 2):
        pid = svc.managed.pid
        killed = time.monotonic()
        kill9(pid)
        await wait_until(lambda: svc.state == "critical", timeout=1.0)  # detected at once: the process exited
        assert time.monotonic() - killed < 1.0
        await wait_until(lambda p=pid: svc.state == "passing" and svc.managed.pid != p, timeout=10)
        took = time.monotonic() - killed
        assert took >= 0.3 * round_, f"restart {round_} came after {took:.2f}s, before its backoff"
    restarts = [e["payload"] for e in await events(node, "charter.services.restarts")]
    assert [r["delay_s"] for r in restarts] == [0.3, 0.6]  # base, then twice base
    assert [r["attempt"] for r in restarts] == [1, 2] and all(r["ok"] and r["automatic"] for r in restarts)
    assert len(starts.read_text().splitlines()) == 3
    states = [(h["previous"], h["state"]) for h in await health(node, "ai.test.web")]
    assert states == [("unknown", "starting"), ("starting", "passing"),
                      ("passing", "critical"), ("critical", "starting"), ("starting", "passing"),
                      ("passing", "critical"), ("critical", "starting"), ("starting", "passing")]


async def test_service_not_run_by_charter_is_caught_by_its_check_within_one_interval(
        node_factory, started: Started, tmp_path: Path) -> None:
    port = free_port()
    marker = f"--starts={tmp_path / 'ext.starts'}"
    started.svc(port, marker)
    wait_port(port)
    node = await node_factory(f"""
[[services]]
label = "ai.test.external"
manager = "command"
interval = "0.5s"
timeout = "1s"
port = {port}
restart = {{ base = "0.1s", command = {toml_list([PY, SVC, "--port", str(port), marker, "--detach"])}, start_period = "5s" }}
[services.check]
kind = "tcp"
""")
    try:
        svc = svc_of(node, "ai.test.external")
        await wait_until(lambda: svc.state == "passing")
        kill9(started.procs[0].pid)
        killed = time.monotonic()
        await wait_until(lambda: svc.state in ("critical", "starting"), timeout=2)
        assert time.monotonic() - killed <= 0.5 + 1.0 + 0.3  # one interval (+ the check's timeout, + slack)
        await wait_until(lambda: svc.state == "passing", timeout=10)
        (restart,) = [e["payload"] for e in await events(node, "charter.services.restarts")]
        assert restart["via"] == "command" and restart["ok"] and str(port) in restart["detail"]
        assert len((tmp_path / "ext.starts").read_text().splitlines()) == 2
    finally:
        await node.supervisor.close()  # first, or it would restart what is killed next
        kill_leftovers(marker)


async def test_flapping_service_reaches_its_start_limit_and_is_not_restarted_again(node_factory, tmp_path: Path) -> None:
    port = free_port()
    starts = tmp_path / "starts.log"
    node = await node_factory(f"""
[[services]]
label = "ai.test.flappy"
tier = "critical"
command = {toml_list([PY, SVC, "--port", str(port), "--starts", str(starts), "--exit-after", "0.3"])}
interval = "1s"
port = {port}
restart = {{ base = "0.1s", cap = "0.2s", start_limit_burst = 3, start_limit_interval = "1m" }}
[services.check]
kind = "tcp"
""")
    svc = svc_of(node, "ai.test.flappy")
    await wait_until(lambda: svc.state == "failed", timeout=15)
    assert "start limit reached: 3 restarts" in svc.reason
    await asyncio.sleep(1.5)  # long past every backoff: nothing else starts
    assert svc.state == "failed" and not svc.managed.alive()
    assert len(starts.read_text().splitlines()) == 4  # the first start and three restarts, then nothing
    alerts = [e["payload"] for e in await events(node, "charter.services.alerts")]
    assert any("start limit reached" in a["alert"] and a["state"] == "failed" for a in alerts)
    assert any(a["alert"].startswith("critical service ai.test.flappy is down") for a in alerts)
    assert len([e for e in await events(node, "charter.services.restarts")]) == 3

    # The operator's restart clears `failed` and the window; the process runs again.
    answer = await node.supervisor.restart("ai.test.flappy")
    assert answer["restarted"] and answer["state"] == "starting"
    await wait_until(lambda: len(starts.read_text().splitlines()) == 5)


async def test_port_answers_but_http_check_fails(node_factory, started: Started, tmp_path: Path) -> None:
    port = free_port()
    status = tmp_path / "status"
    status.write_text("200")
    started.svc(port, "--status-file", str(status), "--body", '{"status": "degraded", "db": {"ok": false}}')
    wait_port(port)
    node = await node_factory(f"""
[[services]]
label = "ai.test.port-only"
interval = "0.3s"
[services.check]
kind = "tcp"
port = {port}

[[services]]
label = "ai.test.json"
interval = "0.3s"
[services.check]
kind = "http"
url = "http://127.0.0.1:{port}/health"
json_field = "status"
json_equals = "ok"

[[services]]
label = "ai.test.body"
interval = "0.3s"
[services.check]
kind = "http"
url = "http://127.0.0.1:{port}/health"
body_contains = "healthy"

[[services]]
label = "ai.test.status"
interval = "0.3s"
failures_before_critical = 2
[services.check]
kind = "http"
url = "http://127.0.0.1:{port}/health"
""")
    sup = node.supervisor
    await wait_until(lambda: all(s.last is not None for s in sup.services.values()))
    await wait_until(lambda: sup.services["ai.test.json"].state == "critical")
    assert sup.services["ai.test.port-only"].state == "passing"  # the port answers...
    assert "status is 'degraded', expected 'ok'" in sup.services["ai.test.json"].reason  # ...the service does not work
    await wait_until(lambda: sup.services["ai.test.body"].state == "critical")
    assert "does not contain 'healthy'" in sup.services["ai.test.body"].reason
    await wait_until(lambda: sup.services["ai.test.status"].state == "passing")
    status.write_text("503")
    st = sup.services["ai.test.status"]
    await wait_until(lambda: st.thresholds.fail_run == 1)
    assert st.state == "passing"  # one failure is not enough (failures_before_critical = 2)
    await wait_until(lambda: st.state == "critical", timeout=3)
    assert "HTTP 503" in st.reason


async def test_freshness_of_a_file_and_of_a_receipt(node_factory, tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat.txt"
    heartbeat.write_text("alive")
    receipts = tmp_path / "receipts"
    receipts.mkdir()
    (receipts / "2026-01-01.json").write_text("{}")
    os.utime(receipts / "2026-01-01.json", (time.time() - 9999, time.time() - 9999))
    newest = receipts / "2026-01-02.json"
    newest.write_text(json.dumps({"service": "backup", "status": "ok", "run_id": "r1",
                                  "generated_at": "2020-01-01T00:00:00+00:00"}))
    node = await node_factory(f"""
[supervisor]
receipts_dir = "receipts-out"

[[services]]
label = "ai.test.job"
interval = "1h"
check = {{ kind = "command", command = {toml_list([PY, "-c", "pass"])} }}

[[services]]
label = "ai.test.job-receipt"
depends = ["ai.test.job"]
interval = "1h"
check = {{ kind = "freshness", path = "receipts-out/ai.test.job.json", receipt = true, max_age_seconds = 60 }}

[[services]]
label = "ai.test.heartbeat"
max_age_seconds = 60
[services.check]
kind = "freshness"
path = "{heartbeat}"

[[services]]
label = "ai.test.backup"
[services.check]
kind = "freshness"
path = "{receipts}/*.json"
receipt = true
max_age_seconds = "1h"
""")
    sup = node.supervisor
    # The supervisor's own receipts, in the operator's format, are what a freshness check reads.
    await wait_until(lambda: sup.services["ai.test.job-receipt"].state == "passing")
    receipt = json.loads((node.home.root / "receipts-out" / "ai.test.job.json").read_text())
    assert {"service": "ai.test.job", "status": "ok"}.items() <= receipt.items()
    assert receipt["run_id"] and receipt["generated_at"]
    assert (await sup.check("ai.test.heartbeat"))["state"] == "passing"
    os.utime(heartbeat, (time.time() - 120, time.time() - 120))
    r = await sup.check("ai.test.heartbeat")
    assert r["state"] == "critical" and "max 60s" in r["result"]["detail"]

    # The newest receipt counts, by its generated_at (not the file's mtime, which is fresh).
    r = await sup.check("ai.test.backup")
    assert r["state"] == "critical" and "2026-01-02.json" in r["result"]["detail"]
    fresh = {"service": "backup", "status": "ok", "run_id": "r2",
             "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    newest.write_text(json.dumps(fresh))
    assert (await sup.check("ai.test.backup"))["state"] == "passing"
    newest.write_text(json.dumps({**fresh, "status": "fail"}))
    r = await sup.check("ai.test.backup")
    assert r["state"] == "critical" and "says status 'fail'" in r["result"]["detail"]


async def test_dependencies_are_checked_first(node_factory, tmp_path: Path) -> None:
    order = tmp_path / "order.log"
    slow = f"import time; time.sleep(0.3); open({str(order)!r}, 'a').write('db ')"
    app = toml_list([PY, "-c", f"open({str(order)!r}, 'a').write('app ')"])
    api = toml_list([PY, "-c", f"open({str(order)!r}, 'a').write('api ')"])
    node = await node_factory(f"""
[[services]]
label = "ai.test.app"
depends = ["ai.test.api"]
interval = "1h"
check = {{ kind = "command", command = {app} }}

[[services]]
label = "ai.test.api"
depends = ["ai.test.db"]
interval = "1h"
check = {{ kind = "command", command = {api} }}

[[services]]
label = "ai.test.db"
interval = "1h"
check = {{ kind = "command", command = {toml_list([PY, "-c", slow])} }}
""")
    sup = node.supervisor
    await wait_until(lambda: all(s.state == "passing" for s in sup.services.values()))
    assert order.read_text().split() == ["db", "api", "app"]
    order.write_text("")
    await sup.run_cycle()
    assert order.read_text().split() == ["db", "api", "app"]
    assert [s["label"] for s in await sup.list()] == ["ai.test.db", "ai.test.api", "ai.test.app"]


async def test_a_dependent_is_not_restarted_before_its_dependency_is_up(node_factory, tmp_path: Path) -> None:
    db_port, app_port = free_port(), free_port()
    node = await node_factory(f"""
[[services]]
label = "ai.test.db"
command = {toml_list([PY, SVC, "--port", str(db_port), "--delay-listen", "0.8"])}
interval = "1s"
retry_interval = "0.1s"
port = {db_port}
restart = {{ base = "0.1s", start_period = "5s" }}
check = {{ kind = "tcp" }}

[[services]]
label = "ai.test.app"
depends = ["ai.test.db"]
command = {toml_list([PY, SVC, "--port", str(app_port)])}
interval = "1s"
retry_interval = "0.1s"
port = {app_port}
restart = {{ base = "0.3s", start_period = "5s" }}
check = {{ kind = "http", url = "http://127.0.0.1:{{port}}/" }}
""")
    sup = node.supervisor
    db, app = sup.services["ai.test.db"], sup.services["ai.test.app"]
    await wait_until(lambda: db.state == "passing" and app.state == "passing")
    kill9(db.managed.pid)
    kill9(app.managed.pid)
    await wait_until(lambda: app.state == "critical" and app.blocked_by == "ai.test.db", timeout=2)
    assert "waiting for ai.test.db" in app.reason
    await wait_until(lambda: db.state == "passing" and app.state == "passing", timeout=15)
    evs = await events(node)
    db_up = [e["seq"] for e in evs if e["subject"] == "charter.services.health"
             and e["payload"]["service"] == "ai.test.db" and e["payload"]["state"] == "passing"][-1]
    app_restart = [e["seq"] for e in evs if e["subject"] == "charter.services.restarts"
                   and e["payload"]["service"] == "ai.test.app"]
    db_restart = [e["seq"] for e in evs if e["subject"] == "charter.services.restarts"
                  and e["payload"]["service"] == "ai.test.db"]
    assert len(app_restart) == 1 and len(db_restart) == 1
    assert db_restart[0] < db_up < app_restart[0]  # the app waited until its database answered


async def test_health_events_are_receipts_signed_by_the_operator_and_history_is_in_sqlite(
        node_factory, started: Started, tmp_path: Path) -> None:
    port = free_port()
    started.svc(port)
    wait_port(port)
    node = await node_factory(f"""
[[services]]
label = "ai.activemirror.cloudflared"
name = "cloudflared"
tier = "critical"
why = "the public tunnel"
interval = "0.3s"
[services.check]
kind = "tcp"
port = {port}
""")
    sup = node.supervisor
    svc = sup.services["ai.activemirror.cloudflared"]
    await wait_until(lambda: svc.state == "passing")
    kill9(started.procs[0].pid)
    await wait_until(lambda: svc.state == "critical", timeout=3)
    evs = await events(node, "charter.services.")
    health_evs = [e for e in evs if e["subject"] == "charter.services.health"]
    assert [e["payload"]["state"] for e in health_evs] == ["passing", "critical"]
    for e in health_evs:
        p = e["payload"]
        assert e["sender"] == "operator"
        assert {"service", "status", "run_id", "generated_at", "state", "previous", "reason", "tier"} <= p.keys()
        assert p["service"] == "ai.activemirror.cloudflared" and p["name"] == "cloudflared"
        assert p["status"] == ("ok" if p["state"] == "passing" else "fail")
        assert "T" in p["generated_at"] and p["generated_at"][-6] in "+-"  # ISO-8601 with a zone
    (alert,) = [e["payload"] for e in evs if e["subject"] == "charter.services.alerts"]
    assert alert["alert"].startswith("critical service ai.activemirror.cloudflared is down")

    db = sqlite3.connect(node.home.db_path)
    rows = db.execute("SELECT kind, state, status FROM service_history WHERE label = ? AND kind = 'state' ORDER BY id",
                      ("ai.activemirror.cloudflared",)).fetchall()
    assert rows == [("state", "passing", "ok"), ("state", "critical", "fail")]
    checks = db.execute("SELECT count(*) FROM service_history WHERE kind = 'check'").fetchone()[0]
    assert checks >= 2
    (state,) = db.execute("SELECT state FROM service_status WHERE label = ?", ("ai.activemirror.cloudflared",)).fetchone()
    assert state == "critical"
    hist = await sup.history_of("ai.activemirror.cloudflared")
    assert 0 < hist["uptime"]["1h"] < 1
    snapshot = await node.state_providers["services"]()
    assert snapshot[0]["label"] == "ai.activemirror.cloudflared" and snapshot[0]["status"] == "fail"
    metrics = node.metrics.render().decode()
    assert 'charter_service_up{service="ai.activemirror.cloudflared",tier="critical"} 0.0' in metrics


async def test_restart_state_survives_the_daemon_and_logs_rotate(node_factory, sup_home, tmp_path: Path) -> None:
    port = free_port()
    text = f"""
[supervisor]
log_max_bytes = 4096
log_backups = 2

[[services]]
label = "ai.test.chatty"
command = {toml_list([PY, SVC, "--port", str(port), "--spam", "20000"])}
interval = "1s"
port = {port}
check = {{ kind = "tcp" }}
"""
    node = await node_factory(text, home=sup_home)
    svc = svc_of(node, "ai.test.chatty")
    await wait_until(lambda: svc.state == "passing")
    logs = node.home.root / "logs" / "services"
    await wait_until(lambda: (logs / "ai.test.chatty.log.2").exists())
    assert not (logs / "ai.test.chatty.log.3").exists()
    for f in logs.iterdir():
        assert f.stat().st_size <= 4096 and f.stat().st_mode & 0o777 == 0o600
    pid = svc.managed.pid
    pidfile = node.home.root / "run" / "services" / "ai.test.chatty.pid"
    assert pidfile.read_text().strip() == str(pid)

    # Stop and start through the supervisor; a stopped service is neither checked nor restarted.
    stopped = await node.supervisor.stop("ai.test.chatty")
    assert stopped["state"] == "stopped" and not pidfile.exists()
    await asyncio.sleep(1.3)
    assert svc.state == "stopped" and svc.managed.pid is None
    await node.supervisor.start_service("ai.test.chatty")
    await wait_until(lambda: svc.state == "passing")
    await node.supervisor.close()  # as the daemon's end does (Node.close)
    assert svc.managed.pid is None and not pidfile.exists()  # what Charter runs stops with it


async def test_reload_adds_and_removes_services(node_factory, tmp_path: Path) -> None:
    port = free_port()
    node = await node_factory(f"""
[[services]]
label = "ai.test.one"
command = {toml_list([PY, SVC, "--port", str(port)])}
port = {port}
check = {{ kind = "tcp" }}
""")
    sup = node.supervisor
    await wait_until(lambda: sup.services["ai.test.one"].state == "passing")
    proc = sup.services["ai.test.one"].managed
    folder = node.home.root / "services"
    folder.mkdir()
    (folder / "hb.toml").write_text(f'label = "ai.test.two"\ncheck = {{ kind = "freshness", path = "{tmp_path}", '
                                    'max_age_seconds = 60 }\n')
    from charter.supervisor.specs import load_specs

    text = node.home.config_path.read_text()
    node.home.config_path.write_text(text[:text.index("[[services]]")])
    changes = await sup.reload(load_specs(node.home, node.home.load_config()))
    assert changes == {"added": ["ai.test.two"], "removed": ["ai.test.one"], "changed": []}
    assert not proc.alive()
    await wait_until(lambda: sup.services["ai.test.two"].state == "passing")


async def test_a_process_left_behind_by_a_killed_daemon_is_replaced_not_duplicated(sup_home, started: Started) -> None:
    port = free_port()
    argv = [PY, SVC, "--port", str(port)]
    leftover = started.svc(port)  # as if a daemon that was SIGKILLed had started it
    wait_port(port)
    pidfile = sup_home.root / "run" / "services" / "ai.test.orphan.pid"
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{leftover.pid}\n")
    from tests.supervisor.conftest import write_services

    write_services(sup_home, f"""
[[services]]
label = "ai.test.orphan"
command = {toml_list(argv)}
port = {port}
interval = "1s"
check = {{ kind = "tcp" }}
""")
    node = Node(sup_home)
    await node.start()
    try:
        svc = svc_of(node, "ai.test.orphan")
        await wait_until(lambda: svc.state == "passing")
        assert leftover.wait(5) is not None  # the old copy was stopped before the new one started
        assert svc.managed.pid != leftover.pid and svc.managed.starts == 1
    finally:
        await node.close()

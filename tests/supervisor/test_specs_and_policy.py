"""Service specs (errors name the file and the key) and the restart policy (backoff, start limit)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from charter.config import Home, parse_config
from charter.errors import ConfigError
from charter.supervisor.policy import RestartPolicy, Thresholds
from charter.supervisor.specs import RestartConfig, dumps_toml, levels, load_specs, parse_service, read_folder

TCP = {"kind": "tcp", "port": 80}


def error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_specs(None, parse_config(data))
    return f"{e.value.where}: {e.value.message}"


def test_defaults_and_inferred_manager() -> None:
    c = parse_config({"services": [
        {"label": "ai.a.web", "check": TCP},
        {"label": "ai.a.job", "command": "python -m job --flag 'two words'"},
        {"label": "ai.a.tunnel", "check": {"kind": "launchd"}},
        {"label": "ai.a.unit", "check": {"kind": "systemd", "unit": "x.service"}},
        {"label": "ai.a.cmd", "check": TCP, "restart": {"command": ["true"]}},
    ]})
    web, job, tunnel, unit, cmd = c.services
    assert web.interval == 300 and web.timeout == 10 and web.tier == "optional"
    assert web.successes_before_passing == 1 and web.failures_before_critical == 1
    assert web.restart.base == 1 and web.restart.cap == 300 and web.restart.start_limit_burst == 5
    assert [s.effective_manager for s in c.services] == ["none", "charter", "launchd", "systemd", "command"]
    assert job.command == ["python", "-m", "job", "--flag", "two words"] and job.check is None
    assert tunnel.launchd_label() == "ai.a.tunnel" and unit.systemd_unit() == "x.service"
    assert web.systemd_unit() == "ai.a.web.service"
    assert c.supervisor.concurrency == 64 and c.supervisor.enabled


@pytest.mark.parametrize(("data", "expected"), [
    ({"services": [{"label": "cloudflared", "check": TCP}]},
     "charter.toml: services[0].label: 'cloudflared' is not a reverse-DNS label"),
    ({"services": [{"label": "ai.a.b", "check": {"kind": "http"}}]},
     "charter.toml: services[0].check: an http check needs `url`"),
    ({"services": [{"label": "ai.a.b", "check": {"kind": "tcp", "port": 1, "body_contains": "x"}}]},
     "charter.toml: services[0].check: `body_contains` does not apply to a tcp check"),
    ({"services": [{"label": "ai.a.b", "check": {"kind": "tcp"}}]},
     "charter.toml: services[0]: a tcp check needs a port"),
    ({"services": [{"label": "ai.a.b", "check": TCP, "interval": "soon"}]},
     "charter.toml: services[0].interval: 'soon' is not a duration"),
    ({"services": [{"label": "ai.a.b", "check": TCP, "restart": {"base": "1m", "cap": "1s"}}]},
     "charter.toml: services[0].restart: cap must be at least base"),
    ({"services": [{"label": "ai.a.b", "check": TCP, "colour": "red"}]},
     "charter.toml: services[0].colour: Extra inputs are not permitted"),
    ({"services": [{"label": "ai.a.b", "check": {"kind": "process"}}]},
     "charter.toml: services[0].check: a process check needs `name`, `cmdline` or `pidfile`"),
    ({"services": [{"label": "ai.a.b", "check": {"kind": "freshness", "path": "/x"}}]},
     "charter.toml: services[0]: a freshness check needs max_age_seconds"),
    ({"services": [{"label": "ai.a.b", "manager": "command", "check": TCP}]},
     "charter.toml: services[0]: manager \"command\" needs restart.command"),
    ({"services": [{"label": "ai.a.b"}]},
     "charter.toml: services[0]: a service needs a `check`"),
    ({"services": [{"label": "ai.a.b", "check": TCP}, {"label": "ai.a.b", "check": TCP}]},
     "charter.toml: services[1].label: service 'ai.a.b' is also declared at charter.toml: services[0]"),
    ({"services": [{"label": "ai.a.b", "check": TCP, "depends": ["ai.a.c"]}]},
     "charter.toml: services[0].depends[0]: depends on 'ai.a.c', which is not a declared service"),
    ({"services": [{"label": "ai.a.b", "check": {"kind": "model", "backend": "nope"}}]},
     "charter.toml: services[0].check.backend: backend 'nope' is not under [models.backends]"),
    ({"models": {"backends": {"o": {"kind": "ollama", "url": "http://x", "managed_service": "ai.gone"}}}},
     "charter.toml: models.backends.o.managed_service: names service 'ai.gone', which is not declared"),
    ({"supervisor": {"concurrency": 0}}, "charter.toml: supervisor.concurrency: Input should be greater than"),
])
def test_errors_name_the_key(data: dict, expected: str) -> None:
    assert error(data).startswith(expected)


def test_dependency_cycles_are_refused() -> None:
    msg = error({"services": [{"label": "ai.a", "check": TCP, "depends": ["ai.b"]},
                              {"label": "ai.b", "check": TCP, "depends": ["ai.c"]},
                              {"label": "ai.c", "check": TCP, "depends": ["ai.a"]}]})
    assert "dependency cycle: ai.a -> ai.b -> ai.c -> ai.a" in msg
    assert levels({"ai.a": [], "ai.b": ["ai.a"], "ai.c": ["ai.a", "ai.b"]}) == {"ai.a": 0, "ai.b": 1, "ai.c": 2}


def test_folder_of_service_files(tmp_path: Path) -> None:
    home = Home(tmp_path)
    folder = tmp_path / "services"
    folder.mkdir()
    (folder / "one.toml").write_text('label = "ai.one"\ncheck = { kind = "tcp", port = 1 }\n')
    (folder / "many.toml").write_text('[[services]]\nlabel = "ai.two"\ndepends = ["ai.one"]\n'
                                      '[services.check]\nkind = "tcp"\nport = 2\n')
    specs = load_specs(home, parse_config({"services": [{"label": "ai.zero", "check": TCP}]}))
    assert [(s.label, s.source) for s in specs] == [
        ("ai.zero", "charter.toml: services[0]"), ("ai.two", "services/many.toml: services[0]"),
        ("ai.one", "services/one.toml")]
    (folder / "bad.toml").write_text('label = "ai.bad"\ncheck = { kind = "tcp", port = "x" }\n')
    with pytest.raises(ConfigError) as e:
        read_folder(folder)
    assert e.value.where == "services/bad.toml: check.port"


def test_importer_toml_round_trips() -> None:
    svc = {"label": "ai.x.y", "name": 'quote " and \\ slash', "port": 8080, "depends": ["ai.a"],
           "env": {"A": "1", "weird key": "2"}, "check": {"kind": "http", "url": "http://127.0.0.1:8080/"},
           "restart": {"base": "2s"}}
    doc = tomllib.loads(dumps_toml([svc, {"label": "ai.a", "check": TCP}], "# header"))
    assert doc["services"][0] == svc
    parse_service(doc["services"][0], "x")


def test_backoff_doubles_to_its_cap_and_resets_after_passing() -> None:
    p = RestartPolicy(RestartConfig(base=1, cap=5, start_limit_burst=100, start_limit_interval=1000, reset_after=60))
    delays = []
    for t in range(6):
        d = p.decide(float(t))
        delays.append(d.delay)
        p.started(float(t))
    assert delays == [1, 2, 4, 5, 5, 5]
    p.passing(100.0)
    p.passing(159.0)
    assert p.decide(159.0).delay == 5  # not yet passing for reset_after
    p.passing(160.0)
    assert p.decide(160.0).delay == 1 and p.decide(160.0).attempt == 1


def test_start_limit_per_window() -> None:
    p = RestartPolicy(RestartConfig(base=1, cap=1, start_limit_burst=3, start_limit_interval=10))
    for t in (0.0, 1.0, 2.0):
        assert p.decide(t).restart
        p.started(t)
    stop = p.decide(3.0)
    assert not stop.restart and "start limit reached: 3 restarts within 10s" in stop.reason
    assert p.decide(10.5).restart  # the first restart left the window
    p.reset()
    assert p.decide(3.0).restart and p.to_dict(3.0)["in_window"] == 0


def test_thresholds() -> None:
    t = Thresholds(successes_before_passing=2, failures_before_critical=3)
    t.observe(True)
    assert not t.passing
    t.observe(True)
    assert t.passing
    for _ in range(2):
        t.observe(False)
    assert not t.critical and not t.passing
    t.observe(False)
    assert t.critical

"""Importers: launchd plists (XML and binary), systemd units and the service registry JSON, written to
temporary directories as fixtures, then through `charter services import` into CHARTER_HOME/services."""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
import tomllib
from pathlib import Path

from charter.config import Home
from charter.supervisor.importers import import_launchd, import_registry, import_systemd
from charter.supervisor.specs import load_specs


def write_plists(d: Path) -> None:
    d.mkdir(parents=True)
    with (d / "ai.activemirror.cloudflared.plist").open("wb") as fh:
        plistlib.dump({"Label": "ai.activemirror.cloudflared", "KeepAlive": True,
                       "ProgramArguments": ["/opt/homebrew/bin/cloudflared", "tunnel", "run"]}, fh)
    with (d / "ai.activemirror.sync.plist").open("wb") as fh:  # binary plist, periodic job
        plistlib.dump({"Label": "ai.activemirror.sync", "Program": "/usr/local/bin/sync.sh", "StartInterval": 300},
                      fh, fmt=plistlib.FMT_BINARY)
    with (d / "com.apple.other.plist").open("wb") as fh:
        plistlib.dump({"Label": "com.apple.other", "Program": "/bin/true"}, fh)
    with (d / "ai.mirrordna.agent.archivist.plist").open("wb") as fh:
        plistlib.dump({"Label": "ai.mirrordna.agent.archivist", "ProgramArguments": ["/usr/bin/archivist"]}, fh)
    (d / "broken.plist").write_text("<plist><dict><key>Label")


def test_launchd_plists_by_prefix(tmp_path: Path) -> None:
    write_plists(tmp_path / "LaunchAgents")
    daemons = tmp_path / "LaunchDaemons"
    daemons.mkdir()
    with (daemons / "ai.activemirror.root.plist").open("wb") as fh:
        plistlib.dump({"Label": "ai.activemirror.root", "Program": "/usr/sbin/rootd", "KeepAlive": True}, fh)
    got = import_launchd("ai.activemirror.", [tmp_path / "LaunchAgents", daemons])
    by = {s["label"]: s for s in got.services}
    assert sorted(by) == ["ai.activemirror.cloudflared", "ai.activemirror.root", "ai.activemirror.sync"]
    assert by["ai.activemirror.cloudflared"]["check"] == {"kind": "launchd"}
    assert "cloudflared tunnel run" in by["ai.activemirror.cloudflared"]["why"]
    assert by["ai.activemirror.sync"]["check"] == {"kind": "launchd", "running": False}  # periodic: last exit 0
    assert by["ai.activemirror.root"]["check"] == {"kind": "launchd", "domain": "system"}
    assert [s["what"] for s in got.skipped] == [str(tmp_path / "LaunchAgents" / "broken.plist")]
    assert import_launchd("ai.", [tmp_path / "LaunchAgents"]).services[-1]["label"] == "ai.mirrordna.agent.archivist"


def test_systemd_units(tmp_path: Path) -> None:
    d = tmp_path / "user"
    d.mkdir()
    (d / "ollama.service").write_text("[Unit]\nDescription=Ollama model server\n\n[Service]\n"
                                      "ExecStart=/usr/bin/ollama serve\nExecStartPre=/bin/true\nExecStartPre=/bin/true\n"
                                      "Environment=A=1\nEnvironment=B=2\n\n[Install]\nWantedBy=default.target\n")
    (d / "ai.mirror.agent.service").write_text("[Service]\nExecStart=/usr/bin/agent --flag=%h\n")
    (d / "worker@.service").write_text("[Service]\nExecStart=/bin/worker %i\n")
    (d / "backup.timer").write_text("[Timer]\nOnCalendar=daily\n")
    got = import_systemd("*", "user", [d])
    by = {s["label"]: s for s in got.services}
    assert sorted(by) == ["ai.mirror.agent", "systemd.user.ollama"]
    assert by["systemd.user.ollama"]["check"] == {"kind": "systemd", "unit": "ollama.service"}
    assert by["systemd.user.ollama"]["why"] == "Ollama model server (/usr/bin/ollama serve)"
    system = import_systemd("ollama.service", "system", [d]).services[0]
    assert system["label"] == "systemd.system.ollama" and system["check"]["scope"] == "system"


def test_service_registry_json(tmp_path: Path) -> None:
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"services": [
        {"name": "Cloudflared", "label": "ai.activemirror.cloudflared", "port": 8443,
         "health_url": "http://127.0.0.1:8443/ready", "category": "network"},
        {"name": "Archivist", "label": "ai.mirrordna.agent.archivist", "port": 7001, "category": "agents"},
        {"name": "Notes", "label": "ai.mirrordna.notes", "category": "apps"},
        {"name": "nameless"},
    ]}))
    got = import_registry(reg, manager="launchd")
    by = {s["label"]: s for s in got.services}
    assert by["ai.activemirror.cloudflared"]["check"] == {"kind": "http", "url": "http://127.0.0.1:8443/ready"}
    assert by["ai.activemirror.cloudflared"]["manager"] == "launchd"
    assert by["ai.activemirror.cloudflared"]["category"] == "network" and by["ai.activemirror.cloudflared"]["port"] == 8443
    assert by["ai.mirrordna.agent.archivist"]["check"] == {"kind": "tcp", "port": 7001}
    assert by["ai.mirrordna.notes"]["check"] == {"kind": "launchd"}
    assert got.skipped == [{"what": "registry.json: services[3]", "why": "no label"}]
    none = import_registry(reg, manager="none")
    assert "ai.mirrordna.notes" not in {s["label"] for s in none.services}
    assert "manager" not in none.services[0]


def charter(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHARTER_HOME": str(home.root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_import_writes_specs_that_load_and_skips_known_labels(home: Home, tmp_path: Path) -> None:
    write_plists(tmp_path / "agents")
    dry = charter(home, "services", "import", "launchd", "--prefix", "ai.activemirror.", "--dir", str(tmp_path / "agents"),
                  "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert len(tomllib.loads(dry.stdout)["services"]) == 2 and not (home.root / "services").exists()
    assert "skipped" in dry.stderr and "broken.plist" in dry.stderr

    done = charter(home, "services", "import", "launchd", "--prefix", "ai.activemirror.", "--dir",
                   str(tmp_path / "agents"), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["written"] == ["ai.activemirror.cloudflared", "ai.activemirror.sync"]
    path = Path(result["file"])
    assert path == home.root / "services" / "imported-launchd.toml"
    specs = load_specs(home, home.load_config())
    assert [s.label for s in specs] == ["ai.activemirror.cloudflared", "ai.activemirror.sync"]
    assert specs[0].config.effective_manager == "launchd"

    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"services": [
        {"name": "Cloudflared", "label": "ai.activemirror.cloudflared", "port": 8443},
        {"name": "Archivist", "label": "ai.mirrordna.agent.archivist", "port": 7001}]}))
    again = charter(home, "services", "import", "registry", str(reg), "--manager", "none", "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["already_declared"] == ["ai.activemirror.cloudflared"]
    assert result["written"] == ["ai.mirrordna.agent.archivist"]
    assert len(load_specs(home, home.load_config())) == 3
    bad = charter(home, "services", "import", "registry", str(tmp_path / "missing.json"))
    assert bad.returncode == 1 and "cannot read" in bad.stderr

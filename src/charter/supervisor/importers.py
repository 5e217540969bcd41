"""Import what the operator already has into service specs.

  launchd   plists whose Label starts with a prefix (`ai.activemirror.`), read with plistlib (XML or
            binary), from ~/Library/LaunchAgents and friends: checked with `launchctl print` and
            restarted with `launchctl kickstart -k`; periodic jobs (StartInterval / StartCalendarInterval
            without KeepAlive) pass when their last exit status is 0.
  systemd   unit files (`*.service`, matched by a glob), from ~/.config/systemd/user or /etc/systemd/system:
            checked with `systemctl show`, restarted with `systemctl restart`.
  registry  a service registry JSON `{"services": [{name, label, port, health_url, category}]}`: an http
            check on health_url, else a tcp check on port, else the platform's manager.

Every importer returns service tables (dicts) that `specs.parse_service` accepts, plus what it skipped
and why. `write_imported` appends them to CHARTER_HOME/services/imported-SOURCE.toml, leaving out
labels that are already declared.
"""

from __future__ import annotations

import configparser
import json
import plistlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charter.errors import CharterError, ConfigError
from charter.supervisor.specs import LABEL, dumps_toml, parse_service

LAUNCHD_DIRS = ("~/Library/LaunchAgents", "/Library/LaunchAgents", "/Library/LaunchDaemons")
SYSTEMD_DIRS = {"user": ("~/.config/systemd/user",), "system": ("/etc/systemd/system",)}


@dataclass
class Imported:
    source: str
    services: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {what, why}

    def add(self, svc: dict[str, Any], what: str) -> None:
        try:
            parse_service(svc, what)
        except ConfigError as exc:
            self.skipped.append({"what": what, "why": f"{exc.message} (at {exc.where})"})
            return
        self.services.append(svc)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "services": self.services, "skipped": self.skipped}


def import_launchd(prefix: str, dirs: list[Path] | None = None) -> Imported:
    """Plists whose Label starts with `prefix`."""
    out = Imported("launchd")
    for d in dirs or [Path(p).expanduser() for p in LAUNCHD_DIRS]:
        if not d.is_dir():
            continue
        system = d.name == "LaunchDaemons"
        for path in sorted(d.glob("*.plist")):
            try:
                with path.open("rb") as fh:
                    data = plistlib.load(fh)
            except Exception as exc:  # noqa: BLE001 - plistlib raises expat, ValueError, InvalidFileException...
                out.skipped.append({"what": str(path), "why": f"not a readable plist: {exc}"})
                continue
            label = data.get("Label") if isinstance(data, dict) else None
            if not isinstance(label, str) or not label.startswith(prefix):
                continue
            program = data.get("ProgramArguments") or ([data["Program"]] if data.get("Program") else [])
            periodic = (data.get("StartInterval") or data.get("StartCalendarInterval")) and not data.get("KeepAlive")
            check: dict[str, Any] = {"kind": "launchd"}
            if periodic:
                check["running"] = False
            if system:
                check["domain"] = "system"
            why = f"launchd job from {path}"
            if program:
                why += ": " + " ".join(str(p) for p in program)[:200]
            out.add({"label": label, "why": why, "check": check}, str(path))
    return out


def _unit_label(stem: str, scope: str) -> str:
    if LABEL.fullmatch(stem):
        return stem
    return f"systemd.{scope}." + re.sub(r"[^A-Za-z0-9_-]", "-", stem)


def import_systemd(pattern: str = "*.service", scope: str = "user", dirs: list[Path] | None = None) -> Imported:
    """Unit files matching `pattern` (templates such as foo@.service are left out)."""
    out = Imported("systemd")
    for d in dirs or [Path(p).expanduser() for p in SYSTEMD_DIRS[scope]]:
        if not d.is_dir():
            continue
        for path in sorted(d.glob(pattern)):
            if path.suffix != ".service" or path.name.endswith("@.service") or not path.is_file():
                continue
            parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                                  comment_prefixes=("#", ";"))
            parser.optionxform = str  # type: ignore[assignment,method-assign]
            try:
                parser.read_string(path.read_text(encoding="utf-8"), str(path))
            except (OSError, configparser.Error) as exc:
                out.skipped.append({"what": str(path), "why": f"not a readable unit: {exc}"})
                continue
            stem = path.name.removesuffix(".service")
            desc = parser.get("Unit", "Description", fallback="").strip()
            exec_start = parser.get("Service", "ExecStart", fallback="").strip()
            check: dict[str, Any] = {"kind": "systemd", "unit": path.name}
            if scope != "user":
                check["scope"] = scope
            why = desc or f"systemd unit {path}"
            if exec_start:
                why += f" ({exec_start[:160]})"
            out.add({"label": _unit_label(stem, scope), "name": stem, "why": why, "check": check}, str(path))
    return out


def import_registry(path: Path, manager: str | None = None) -> Imported:
    """`{"services": [{name, label, port, health_url, category}]}`."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CharterError("not_found", f"cannot read {path}: {exc}", str(path)) from None
    except ValueError as exc:
        raise CharterError("malformed", f"{path} is not JSON: {exc}", str(path)) from None
    items = doc.get("services") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise CharterError("malformed", 'a service registry is {"services": [{name, label, port, health_url, category}]}',
                           f"{path}: services")
    mgr = manager or ("launchd" if sys.platform == "darwin" else "none")
    out = Imported("registry")
    for i, e in enumerate(items):
        what = f"{path.name}: services[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("label"), str):
            out.skipped.append({"what": what, "why": "no label"})
            continue
        port, url = e.get("port"), e.get("health_url")
        svc: dict[str, Any] = {"label": e["label"]}
        if isinstance(e.get("name"), str):
            svc["name"] = e["name"]
        if isinstance(e.get("category"), str):
            svc["category"] = e["category"]
        if isinstance(port, int) and not isinstance(port, bool):
            svc["port"] = port
        if isinstance(url, str) and url:
            check: dict[str, Any] = {"kind": "http", "url": url}
        elif "port" in svc:
            check = {"kind": "tcp", "port": svc["port"]}
        elif mgr == "launchd":
            check = {"kind": "launchd"}
        elif mgr == "systemd":
            check = {"kind": "systemd"}
        else:
            out.skipped.append({"what": what, "why": f"{e['label']}: no health_url or port to check"})
            continue
        svc["check"] = check
        if mgr != "none" and check["kind"] not in ("launchd", "systemd"):
            svc["manager"] = mgr
        svc["why"] = f"from the service registry {path.name}"
        out.add(svc, what)
    return out


def write_imported(folder: Path, imported: Imported, known: set[str]) -> tuple[Path | None, list[str], list[str]]:
    """Append new services to folder/imported-SOURCE.toml. Returns (file, labels written, labels already known)."""
    fresh = [s for s in imported.services if s["label"] not in known]
    dup = [s["label"] for s in imported.services if s["label"] in known]
    if not fresh:
        return None, [], dup
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"imported-{imported.source}.toml"
    header = "" if path.exists() else (f"# Services imported by `charter services import {imported.source}`. Edit freely;\n"
                                       "# `charter services reload` (or restarting the daemon) applies changes.\n")
    with path.open("a", encoding="utf-8") as fh:
        fh.write(dumps_toml(fresh, header))
    return path, [s["label"] for s in fresh], dup

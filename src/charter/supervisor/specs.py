"""Service specs: what the supervisor watches, how it checks it, and how it restarts it.

A spec comes from `[[services]]` in charter.toml or from `CHARTER_HOME/services/*.toml` (each file
either holds `[[services]]` tables or is one service). Both are validated by the same pydantic
models, and every error names the file and the key (`charter.toml: services[2].check: an http
check needs url`). `load_specs` merges the two sources and checks what spans them: unique labels,
dependencies that exist and form no cycle, model checks that name a configured backend.

This module imports nothing from `charter.config` (which imports it), only the shared units.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from charter.errors import ConfigError
from charter.units import parse_duration, parse_size

if TYPE_CHECKING:
    from charter.config import Config, Home

Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_size)]

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+")
# launchd domains a check can look in: system (LaunchDaemons), or a user's gui / user domain (UID optional).
LAUNCHD_DOMAIN = re.compile(r"system|(gui|user)(/\d+)?")
CHECK_KINDS = ("launchd", "systemd", "process", "tcp", "http", "command", "model", "freshness")
MANAGERS = ("charter", "launchd", "systemd", "command", "none")

# Which optional check fields each kind reads; any other field set on a check is an error.
_CHECK_FIELDS: dict[str, set[str]] = {
    "launchd": {"label", "domain", "running"},
    "systemd": {"unit", "scope", "states"},
    "process": {"name", "cmdline", "pidfile", "min_count"},
    "tcp": {"host", "port"},
    "http": {"url", "method", "status", "body_contains", "json_field", "json_equals", "headers"},
    "command": {"command", "exit_code", "shell"},
    "model": {"backend"},
    "freshness": {"path", "max_age_seconds", "receipt", "field"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {"http": ("url",), "command": ("command",), "model": ("backend",),
                                         "freshness": ("path",)}


def _argv(value: Any) -> list[str] | None:
    """A command as a list of arguments; a string is split the way a POSIX shell would."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
        if not parts:
            raise ValueError("the command is empty")
        return parts
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return value
    raise ValueError("a command is a string or a non-empty list of strings")


Argv = Annotated[list[str] | None, BeforeValidator(_argv)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckConfig(_Strict):
    """One table for every kind; `kind` says which fields apply (others are refused)."""

    kind: Literal["launchd", "systemd", "process", "tcp", "http", "command", "model", "freshness"]
    # launchd
    label: str | None = None  # default: the service's label
    domain: str | None = None  # system, gui[/UID] or user[/UID]; default gui/<this uid>
    running: bool | None = None  # default true: a PID is required; false: loaded and last exit 0 (periodic jobs)
    # systemd
    unit: str | None = None  # default: <label>.service
    scope: Literal["user", "system"] | None = None  # default user
    states: list[str] | None = None  # ActiveState values that pass; default ["active"]
    # process
    name: str | None = None  # the process name, exactly
    cmdline: str | None = None  # a substring of the command line
    pidfile: str | None = None
    min_count: int | None = Field(None, ge=1)
    # tcp
    host: str | None = None  # default 127.0.0.1
    port: int | None = Field(None, ge=1, le=65535)  # default: the service's port
    # http
    url: str | None = None  # `{port}` is replaced by the service's port
    method: Literal["GET", "HEAD", "POST"] | None = None
    status: int | list[int] | None = None  # default: any 2xx or 3xx
    body_contains: str | None = None
    json_field: str | None = None  # dotted path into a JSON answer, e.g. "status" or "checks.db.ok"
    json_equals: Any = None  # the value it must have; unset: it must exist and be truthy
    headers: dict[str, str] | None = None
    # command
    command: Argv = None
    exit_code: int | None = None  # default 0
    shell: bool | None = None
    # model
    backend: str | None = None  # a name under [models.backends]
    # freshness
    path: str | None = None  # a file (or a glob: the newest match counts)
    max_age_seconds: Seconds | None = None  # default: the service's max_age_seconds
    receipt: bool | None = None  # the file is a health receipt: its generated_at counts, and status must be ok
    field: str | None = None  # a JSON field holding the time (ISO-8601 or epoch seconds)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> CheckConfig:
        allowed = _CHECK_FIELDS[self.kind]
        for name in type(self).model_fields:
            if name != "kind" and name not in allowed and getattr(self, name) is not None:
                raise ValueError(f"`{name}` does not apply to a {self.kind} check "
                                 f"(it takes {', '.join(sorted(allowed)) or 'no other fields'})")
        for name in _REQUIRED.get(self.kind, ()):
            if getattr(self, name) is None:
                raise ValueError(f"{'an' if self.kind[0] in 'aeiouh' else 'a'} {self.kind} check needs `{name}`")
        if self.kind == "process" and not (self.name or self.cmdline or self.pidfile):
            raise ValueError("a process check needs `name`, `cmdline` or `pidfile`")
        if self.kind == "launchd" and self.domain is not None and not LAUNCHD_DOMAIN.fullmatch(self.domain):
            raise ValueError(f"domain {self.domain!r} is not a launchd domain: use \"system\" (LaunchDaemons), "
                             "\"gui\" or \"gui/UID\" (LaunchAgents, the default), or \"user\" / \"user/UID\"")
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):  # type: ignore[union-attr]
            raise ValueError("url must start with http:// or https://")
        return self


class RestartConfig(_Strict):
    base: Seconds = Field(1.0, gt=0)  # the first restart waits this long; each next one twice as long
    cap: Seconds = Field(300.0, gt=0)  # ... up to this
    start_limit_burst: int = Field(5, ge=1)  # at most this many restarts ...
    start_limit_interval: Seconds = Field(1800.0, gt=0)  # ... within this window; past it: `failed`
    start_period: Seconds = Field(30.0, ge=0)  # after a start, failing checks are retried, not restarted
    reset_after: Seconds = Field(600.0, gt=0)  # passing this long resets the backoff
    command: Argv = None  # for manager = "command": runs to restart the service

    @model_validator(mode="after")
    def _cap(self) -> RestartConfig:
        if self.cap < self.base:
            raise ValueError("cap must be at least base")
        return self


class ServiceConfig(_Strict):
    label: str  # reverse-DNS, e.g. ai.activemirror.cloudflared
    name: str | None = None
    check: CheckConfig | None = None  # optional when Charter runs `command`: then the process must be alive
    interval: Seconds = Field(300.0, gt=0)
    timeout: Seconds = Field(10.0, gt=0)
    retry_interval: Seconds | None = Field(None, gt=0)  # while a state change is pending; default min(interval, 5s)
    successes_before_passing: int = Field(1, ge=1)
    failures_before_critical: int = Field(1, ge=1)
    depends: list[str] = Field(default_factory=list)
    tier: Literal["critical", "optional"] = "optional"
    why: str = ""
    category: str | None = None
    manager: Literal["charter", "launchd", "systemd", "command", "none"] | None = None  # default: inferred
    command: Argv = None  # Charter runs and keeps this process (manager "charter")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    autostart: bool = True
    stop_timeout: Seconds = Field(10.0, gt=0)
    restart: RestartConfig = RestartConfig()
    port: int | None = Field(None, ge=1, le=65535)
    max_age_seconds: Seconds | None = Field(None, gt=0)

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if len(value) > 200 or not LABEL.fullmatch(value):
            raise ValueError(f"{value!r} is not a reverse-DNS label such as 'ai.activemirror.cloudflared' "
                             "(dot-separated letters, digits, '_' or '-')")
        return value

    @field_validator("depends")
    @classmethod
    def _depends(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a dependency is listed twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceConfig:
        if self.check is None and self.command is None:
            raise ValueError("a service needs a `check` (or a `command` that Charter runs and watches)")
        m = self.effective_manager
        if m == "charter" and self.command is None:
            raise ValueError("manager \"charter\" runs `command`, which is missing")
        if m == "command" and self.restart.command is None:
            raise ValueError("manager \"command\" needs restart.command")
        if self.label in self.depends:
            raise ValueError("a service cannot depend on itself")
        c = self.check
        if c is not None and c.kind == "tcp" and c.port is None and self.port is None:
            raise ValueError("a tcp check needs a port (check.port or the service's port)")
        if c is not None and c.kind == "http" and "{port}" in (c.url or "") and self.port is None:
            raise ValueError("the check's url uses {port} but the service has no port")
        if c is not None and c.kind == "freshness" and c.max_age_seconds is None and self.max_age_seconds is None:
            raise ValueError("a freshness check needs max_age_seconds (on the check or the service)")
        return self

    @property
    def effective_manager(self) -> str:
        """Who restarts it: set explicitly, else Charter for a command, else the check's own manager."""
        if self.manager:
            return self.manager
        if self.command is not None:
            return "charter"
        if self.check is not None and self.check.kind in ("launchd", "systemd"):
            return self.check.kind
        if self.restart.command is not None:
            return "command"
        return "none"

    @property
    def display_name(self) -> str:
        return self.name or self.label

    @property
    def retry(self) -> float:
        return self.retry_interval if self.retry_interval is not None else min(self.interval, 5.0)

    def systemd_unit(self) -> str:
        unit = (self.check.unit if self.check and self.check.kind == "systemd" else None) or self.label
        return unit if "." in unit.rsplit("/", 1)[-1] and unit.endswith((".service", ".timer", ".socket", ".target")) \
            else unit + ".service"

    def systemd_scope(self) -> str:
        return (self.check.scope if self.check and self.check.kind == "systemd" else None) or "user"

    def launchd_label(self) -> str:
        return (self.check.label if self.check and self.check.kind == "launchd" else None) or self.label


class SupervisorConfig(_Strict):
    enabled: bool = True
    concurrency: int = Field(64, ge=1, le=4096)  # checks in flight at once
    history_retention: Seconds = Field(7 * 86400.0, gt=0)  # check results kept this long (state changes forever)
    log_max_bytes: Bytes = Field(10 * 2**20, ge=1024)  # a managed process's log rotates at this size
    log_backups: int = Field(3, ge=0, le=100)
    receipts_dir: str | None = None  # when set, a health receipt LABEL.json is written there after each check
    # `charter run` defaults (each has a flag)
    run_cpu: Seconds = Field(3600.0, gt=0)
    run_memory: Bytes = Field(2 * 2**30, ge=16 * 2**20)
    run_files: int = Field(1024, ge=16)
    run_jail: Literal["auto", "always", "never"] = "auto"


# ----------------------------------------------------------------------------------------------
# loading and cross-checks


@dataclass(frozen=True)
class Spec:
    """A validated service and where it was declared (for error messages)."""

    config: ServiceConfig
    source: str  # e.g. "charter.toml: services[0]" or "services/ollama.toml"

    @property
    def label(self) -> str:
        return self.config.label


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def parse_service(data: Any, where: str) -> ServiceConfig:
    """Validate one service table; the error names `where` and the key inside it."""
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _loc(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        sep = " " if where.endswith(":") else "."
        raise ConfigError(msg, f"{where}{sep}{key}" if key else where.rstrip(":")) from None


def read_folder(folder: Path) -> list[Spec]:
    """`CHARTER_HOME/services/*.toml`: each file has `[[services]]`, or is one service's table."""
    specs: list[Spec] = []
    if not folder.is_dir():
        return specs
    for path in sorted(folder.glob("*.toml")):
        name = f"services/{path.name}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", name) from None
        if "services" in data:
            extra = sorted(set(data) - {"services"})
            if extra:
                raise ConfigError(f"unknown key {extra[0]!r} next to [[services]]", f"{name}: {extra[0]}")
            if not isinstance(data["services"], list):
                raise ConfigError("services must be an array of tables ([[services]])", f"{name}: services")
            for i, item in enumerate(data["services"]):
                specs.append(Spec(parse_service(item, f"{name}: services[{i}]"), f"{name}: services[{i}]"))
        elif data:
            specs.append(Spec(parse_service(data, f"{name}:"), name))
    return specs


def check_specs(specs: list[Spec], config: Config | None = None) -> list[Spec]:
    """Labels unique, dependencies known and acyclic, model checks on configured backends."""
    by_label: dict[str, Spec] = {}
    for s in specs:
        if s.label in by_label:
            raise ConfigError(f"service {s.label!r} is also declared at {by_label[s.label].source}", f"{s.source}.label")
        by_label[s.label] = s
    for s in specs:
        for i, dep in enumerate(s.config.depends):
            if dep not in by_label:
                raise ConfigError(f"depends on {dep!r}, which is not a declared service", f"{s.source}.depends[{i}]")
    levels({s.label: s.config.depends for s in specs})  # raises on a cycle
    if config is not None:
        backends = config.models.backends
        for s in specs:
            c = s.config.check
            if c is not None and c.kind == "model" and c.backend not in backends:
                raise ConfigError(f"backend {c.backend!r} is not under [models.backends]", f"{s.source}.check.backend")
        for name, b in backends.items():
            if b.managed_service and b.managed_service not in by_label:
                raise ConfigError(f"names service {b.managed_service!r}, which is not declared under [[services]]",
                                  f"charter.toml: models.backends.{name}.managed_service")
    return specs


def levels(deps: dict[str, list[str]]) -> dict[str, int]:
    """Topological depth of every label (0: depends on nothing). Raises ConfigError on a cycle."""
    depth: dict[str, int] = {}
    visiting: list[str] = []

    def visit(label: str) -> int:
        if label in depth:
            return depth[label]
        if label in visiting:
            cycle = visiting[visiting.index(label):] + [label]
            raise ConfigError("dependency cycle: " + " -> ".join(cycle), f"services: {label}.depends")
        visiting.append(label)
        d = 1 + max((visit(x) for x in deps.get(label, []) if x in deps), default=-1)
        visiting.pop()
        depth[label] = d
        return d

    for label in deps:
        visit(label)
    return depth


def load_specs(home: Home | None, config: Config) -> list[Spec]:
    """Every service: charter.toml's `[[services]]`, then CHARTER_HOME/services/*.toml."""
    specs = [Spec(s, f"charter.toml: services[{i}]") for i, s in enumerate(config.services)]
    if home is not None:
        specs += read_folder(home.root / "services")
    return check_specs(specs, config)


def dumps_toml(services: list[dict[str, Any]], header: str = "") -> str:
    """Service tables as `[[services]]` TOML (the shapes importers produce: scalars, lists, flat tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }" if v else "{}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else value(k)

    out = [header.rstrip() + "\n"] if header else []
    for s in services:
        out.append("\n[[services]]\n")
        tables = {k: v for k, v in s.items() if isinstance(v, dict) and k in ("check", "restart")}
        for k, v in s.items():
            if k not in tables and v is not None:
                out.append(f"{key(k)} = {value(v)}\n")
        for k, v in tables.items():
            out.append(f"[services.{k}]\n")
            for kk, vv in v.items():
                if vv is not None:
                    out.append(f"{key(kk)} = {value(vv)}\n")
    return "".join(out)

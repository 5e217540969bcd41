"""`charter.toml`: one file, validated on load, with errors that name the file and the key.

`Home` knows where everything lives under CHARTER_HOME; `Config` is the validated content.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from charter.bus.subjects import SubjectError, validate_pattern
from charter.errors import ConfigError
from charter.supervisor.specs import ServiceConfig, SupervisorConfig
from charter.units import parse_duration, parse_size

DEFAULT_PORT = 7477
CONFIG_NAME = "charter.toml"

Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
Tier = Literal["T0", "T1", "T2", "T3"]
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    log_format: Literal["text", "json"] = "text"
    access_log: bool = False  # a log line for every request (errors are always logged)


class BusConfig(_Strict):
    backend: Literal["sqlite", "nats"] = "sqlite"
    max_envelope_bytes: Bytes = Field(64 * 1024, ge=256, le=16 * 2**20)
    max_batch: int = Field(1000, ge=1, le=100_000)
    replay_window: Seconds = Field(120.0, gt=0, le=86400)
    synchronous: Literal["normal", "full"] = "normal"
    # backend = "nats" (docs/nats.md): the log is a JetStream stream on these servers
    nats_url: str | list[str] = "nats://127.0.0.1:4222"
    stream: str = Field("CHARTER", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    nats_creds: str | None = None  # a .creds file (user JWT + seed) when the server runs in operator mode
    nats_replicas: int = Field(1, ge=1, le=5)  # the stream's replicas in a JetStream cluster
    nats_agents: bool = False  # Charter is the NATS operator: agents get user JWTs (`charter nats setup`)
    nats_fanout: bool = True  # publish accepted entries on ev.<subject> (one daemon per log should)

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, value: str | list[str]) -> str | list[str]:
        for url in [value] if isinstance(value, str) else value:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url!r} is not a NATS URL (nats://host:4222)")
        return value


class StoreConfig(_Strict):
    """Where shared state lives: the registry and the budget ledger move (docs/deployment-two-machines.md)."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    postgres_dsn: str = "host=127.0.0.1 port=5432 dbname=charter"  # a libpq connection string
    postgres_pool: int = Field(4, ge=1, le=64)  # connections per daemon


class IdentityConfig(_Strict):
    charter_ttl: Seconds = Field(30 * 86400.0, gt=0)
    renew_before: Seconds = Field(7 * 86400.0, gt=0)
    invite_ttl: Seconds = Field(900.0, gt=0)
    max_invite_ttl: Seconds = Field(7 * 86400.0, gt=0)


class PolicyConfig(_Strict):
    approval_ttl: Seconds = Field(900.0, gt=0, le=30 * 86400)


class BudgetConfig(_Strict):
    timezone: str = "UTC"
    soft_ratio: float = Field(0.8, gt=0, le=1)
    reservation_ttl: Seconds = Field(600.0, gt=0, le=86400)
    tier_caps: dict[Tier, float] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as 'Europe/Berlin'") from None
        return value

    @field_validator("tier_caps")
    @classmethod
    def _caps(cls, value: dict[str, float]) -> dict[str, float]:
        for tier, cap in value.items():
            if cap < 0:
                raise ValueError(f"cap for {tier} cannot be negative")
        return value


class PriceConfig(_Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class BackendConfig(_Strict):
    kind: Literal["ollama", "openai"]
    url: str
    api_key_env: str | None = None  # name of an environment variable holding the key
    api_key_file: str | None = None  # or a file (mode 0600) holding it
    managed_service: str | None = None  # a supervisor label that runs this backend

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value.rstrip("/")


class TimeoutsConfig(_Strict):
    connect: Seconds = Field(2.0, gt=0)
    first_token: Seconds = Field(20.0, gt=0)
    cold_first_token: Seconds = Field(120.0, gt=0)  # when /api/ps shows the model is not loaded
    idle: Seconds = Field(15.0, gt=0)
    total: Seconds = Field(300.0, gt=0)
    # A streamed answer whose client takes no chunk for this long ends as a hang-up does: the
    # backend is let go (an Ollama slot freed for the others) and what went out is settled.
    client_stall: Seconds = Field(60.0, gt=0)


class BreakerConfig(_Strict):
    failures: int = Field(3, ge=1)  # consecutive soft failures before the circuit opens
    cooldown: Seconds = Field(5.0, gt=0)  # first open period; doubles while probes keep failing
    max_cooldown: Seconds = Field(120.0, gt=0)


class ProbeConfig(_Strict):
    interval: Seconds = Field(30.0, gt=0)
    timeout: Seconds = Field(10.0, gt=0)
    prompt: str = "Reply with the single word: ready"


class ModelsConfig(_Strict):
    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    aliases: dict[str, list[str]] = Field(default_factory=dict)
    default_max_tokens: int = Field(1024, ge=1)
    midstream: Literal["continue", "error"] = "continue"
    log_content: bool = False  # prompts and answers in call events (default: only their hashes)
    degraded_cache: int = Field(256, ge=0)  # recent answers kept for identical prompts
    # alias -> capsule injected as a system message: "agent" (the caller's own), AI_ALIGNMENT,
    # OPS_STATUS, or a spec under [capsules.specs] (one with scope "agent" is built for the caller)
    inject_capsule: dict[str, str] = Field(default_factory=dict)
    timeouts: TimeoutsConfig = TimeoutsConfig()
    breaker: BreakerConfig = BreakerConfig()
    probe: ProbeConfig = ProbeConfig()

    @field_validator("aliases")
    @classmethod
    def _chains(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for alias, chain in value.items():
            if not chain:
                raise ValueError(f"alias {alias!r} has an empty chain")
            for ref in chain:
                if ref != "degraded" and "/" not in ref:
                    raise ValueError(f"alias {alias!r}: {ref!r} is not BACKEND/MODEL or 'degraded'")
        return value


class CapsuleSpecConfig(_Strict):
    template: str  # a file in CHARTER_HOME/capsules/templates
    capsule_type: str | None = None
    scope: Literal["global", "agent"] = "global"


class CapsulesConfig(_Strict):
    enabled: bool = True  # the daemon rebuilds AI_ALIGNMENT and OPS_STATUS
    interval: Seconds = Field(900.0, gt=0)  # on this schedule
    debounce: Seconds = Field(2.0, ge=0)  # and this long after a relevant event
    max_age: Seconds = Field(3600.0, gt=0)  # older than this is a contradiction
    keep_builds: int = Field(50, ge=1, le=10_000)  # timestamped builds kept per capsule, for `capsule diff`
    specs: dict[str, CapsuleSpecConfig] = Field(default_factory=dict)

    @field_validator("specs")
    @classmethod
    def _spec_names(cls, value: dict[str, CapsuleSpecConfig]) -> dict[str, CapsuleSpecConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name):
                raise ValueError(f"capsule spec {name!r}: use capital letters, digits and '_' (e.g. WEEKLY_REVIEW)")
        return value


class ArchiveConfig(_Strict):
    """The archivist (docs/archive.md): segments, signed checkpoints, mirrors, retention."""

    enabled: bool = True  # the daemon runs the archivist
    segment_entries: int = Field(10_000, ge=1, le=10_000_000)  # seal a segment once this many entries wait
    seal_interval: Seconds = Field(3600.0, gt=0)  # ...or once the oldest waiting entry is this old
    checkpoint_interval: Seconds = Field(300.0, gt=0)  # a signed checkpoint of the live head, if it moved
    compression_level: int = Field(3, ge=1, le=19)  # zstd
    mirrors: list[str] = Field(default_factory=list)  # directories that get a verified copy
    sync_interval: Seconds = Field(3600.0, gt=0)  # besides after every seal
    sync_max_age: Seconds = Field(86400.0, gt=0)  # a last sync older than this is a contradiction
    hot_retention: Seconds = Field(0.0, ge=0)  # remove archived+mirrored entries older than this; 0 keeps all
    prune_unmirrored: bool = False  # allow retention with no mirror configured
    verify_interval: Seconds = Field(86400.0, gt=0)  # a full `archive verify` in the background

    @field_validator("mirrors")
    @classmethod
    def _mirrors(cls, value: list[str]) -> list[str]:
        for i, path in enumerate(value):
            if not path.strip():
                raise ValueError(f"entry {i}: a mirror is a directory path, not an empty string")
        if len(set(value)) != len(value):
            raise ValueError("the same mirror is listed twice")
        return value


class RoleConfig(_Strict):
    description: str = ""
    publish: list[str] = Field(default_factory=list)
    subscribe: list[str] = Field(default_factory=list)
    read: list[str] = Field(default_factory=list)
    policy: str = "default"
    max_tier: Tier = "T1"
    sandbox_quota: Bytes = Field(256 * 2**20, ge=0)
    budget_usd_per_day: float | None = Field(None, ge=0)
    budget_tokens_per_day: int | None = Field(None, ge=0)
    charter_ttl: Seconds | None = None

    @field_validator("publish", "subscribe")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            try:
                validate_pattern(pattern.replace("{name}", "x").replace("{id}", "x"))
            except SubjectError as exc:
                raise ValueError(f"entry {i}: {exc}") from None
        return value


class Config(_Strict):
    daemon: DaemonConfig = DaemonConfig()
    bus: BusConfig = BusConfig()
    store: StoreConfig = StoreConfig()
    identity: IdentityConfig = IdentityConfig()
    policy: PolicyConfig = PolicyConfig()
    budget: BudgetConfig = BudgetConfig()
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    models: ModelsConfig = ModelsConfig()
    capsules: CapsulesConfig = CapsulesConfig()
    archive: ArchiveConfig = ArchiveConfig()
    truths: list[dict[str, Any]] = Field(default_factory=list)  # user truths: {id, claim, severity, fix, expect}
    supervisor: SupervisorConfig = SupervisorConfig()
    services: list[ServiceConfig] = Field(default_factory=list)  # [[services]]; more in CHARTER_HOME/services/*.toml
    roles: dict[str, RoleConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _chains_name_backends(self) -> Config:
        for alias, chain in self.models.aliases.items():
            for ref in chain:
                backend = ref.split("/", 1)[0]
                if ref != "degraded" and backend not in self.models.backends:
                    raise ValueError(f"models.aliases.{alias}: backend {backend!r} is not under [models.backends]")
        known = {"agent", "AGENT", "AI_ALIGNMENT", "OPS_STATUS", *self.capsules.specs}
        for alias, which in self.models.inject_capsule.items():
            if which not in known:
                raise ValueError(f"models.inject_capsule.{alias}: no capsule {which!r}; "
                                 f"known: {', '.join(sorted(known))}")
        return self

    @field_validator("roles")
    @classmethod
    def _role_names(cls, value: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"role name {name!r}: use lowercase letters, digits, '-' or '_'")
        return value


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_config(data: dict[str, Any], source: str = CONFIG_NAME) -> Config:
    """Validate a decoded TOML document; the error names `source` and the dotted key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"{source}: {_loc(first['loc'])}"
        msg = first["msg"].removeprefix("Value error, ")
        more = len(exc.errors()) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(msg, where) from None


class Home:
    """The layout of CHARTER_HOME. Creating it is `charter.identity.init`'s job."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> Home:
        """`--home` wins, then $CHARTER_HOME, then ~/.charter."""
        if home:
            return cls(Path(home))
        env = os.environ.get("CHARTER_HOME")
        if env:
            return cls(Path(env))
        return cls(Path.home() / ".charter")

    config_path = property(lambda self: self.root / CONFIG_NAME)
    keys_dir = property(lambda self: self.root / "keys")
    root_key_path = property(lambda self: self.root / "keys" / "root.key")
    db_path = property(lambda self: self.root / "charter.db")
    # The budget ledger's own file: its commits and the log's appends, on one file, each emptied
    # the other's page cache (see charter.budget.ledger).
    budget_db_path = property(lambda self: self.root / "budget.db")
    policies_dir = property(lambda self: self.root / "policies")
    sandboxes_dir = property(lambda self: self.root / "sandboxes")
    run_dir = property(lambda self: self.root / "run")
    daemon_file = property(lambda self: self.root / "run" / "daemon.json")
    log_file = property(lambda self: self.root / "run" / "daemon.log")

    def exists(self) -> bool:
        return self.config_path.exists() and self.root_key_path.exists()

    def load_config(self) -> Config:
        if not self.config_path.exists():
            raise ConfigError(
                f"no {CONFIG_NAME} in {self.root}; run `charter init` first", str(self.config_path)
            )
        try:
            data = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", str(self.config_path)) from None
        return parse_config(data, str(self.config_path))

    def url(self, config: Config | None = None) -> str:
        cfg = config or self.load_config()
        return f"http://{cfg.daemon.host}:{cfg.daemon.port}"

    def __repr__(self) -> str:
        return f"Home({str(self.root)!r})"

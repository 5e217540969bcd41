"""Policy files (`CHARTER_HOME/policies/*.toml`), each identified by id, version and content hash.

The hash is SHA-256 over the canonical JSON of the parsed file, so reformatting a file or
reordering its keys does not change it, while any change of meaning does.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.encoding import canonical, sha256_hex
from charter.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Policy:
    id: str
    version: int
    hash: str
    description: str
    rules: tuple[dict[str, Any], ...]
    path: Path

    def binding(self) -> dict[str, Any]:
        """What an agent's charter records: enough to prove which policy text bound it."""
        return {"id": self.id, "version": self.version, "hash": self.hash}


def load_policy(path: Path) -> Policy:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", str(path)) from None
    pid = data.get("id")
    if not isinstance(pid, str) or not pid:
        raise ConfigError("a policy needs a string `id`", f"{path}: id")
    if pid != path.stem:
        raise ConfigError(f"policy id {pid!r} must match its file name {path.stem!r}", f"{path}: id")
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise ConfigError("a policy needs an integer `version` of 1 or more", f"{path}: version")
    rules = data.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError("`rules` must be an array of tables ([[rules]])", f"{path}: rules")
    return Policy(
        id=pid, version=version, hash=sha256_hex(canonical(data)),
        description=str(data.get("description", "")), rules=tuple(rules), path=path,
    )


def load_policies(directory: Path) -> dict[str, Policy]:
    return {p.id: p for p in (load_policy(f) for f in sorted(directory.glob("*.toml")))}

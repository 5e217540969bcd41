"""A daemon whose gateway fronts two real stand-in Ollama processes (primary and backup).

The stand-in (`charter.models.standin`) speaks Ollama's wire format with its fault modes; a real
Ollama cannot be installed on these machines. Swap the URLs to point at a real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from charter.config import Home
from charter.models.standin import StandinProcess, spawn_standin
from charter.server.daemon import stop
from tests.conftest import Daemon, make_home, start_daemon

GATEWAY_CONFIG = """
[models]
default_max_tokens = 256
midstream = "{midstream}"

[models.backends.primary]
kind = "ollama"
url = "http://127.0.0.1:{primary}"

[models.backends.backup]
kind = "ollama"
url = "http://127.0.0.1:{backup}"

[models.aliases]
default = ["primary/llama3.2:3b", "backup/qwen2.5:0.5b", "degraded"]
strict = ["primary/llama3.2:3b", "backup/qwen2.5:0.5b"]
solo = ["primary/llama3.2:3b", "degraded"]

[models.timeouts]
connect = "1s"
first_token = "{first_token}"
cold_first_token = "6s"
idle = "1s"
total = "20s"
client_stall = "1m"

[models.breaker]
failures = 2
cooldown = "{cooldown}"
max_cooldown = "4s"

[models.probe]
interval = "{probe}"
timeout = "2s"
"""


@dataclass
class Fleet:
    home: Home
    daemon: Daemon
    primary: StandinProcess
    backup: StandinProcess


def gateway_home(root: Path, primary: int, backup: int, *, midstream: str = "continue", first_token: str = "1.5s",
                 cooldown: str = "1s", probe: str = "1s") -> Home:
    home = make_home(root)
    text = home.config_path.read_text()
    start = text.index("# The model gateway.")
    end = text.index("# Roles: what an enrolled agent may do.")
    text = text[:start] + GATEWAY_CONFIG.format(primary=primary, backup=backup, midstream=midstream,
                                                first_token=first_token, cooldown=cooldown, probe=probe) + "\n" + text[end:]
    home.config_path.write_text(text)
    return home


def start_fleet(root: Path, **kw: str) -> Fleet:
    primary = spawn_standin(models=["llama3.2:3b"], control_port=True, token_delay=0.001)
    backup = spawn_standin(models=["qwen2.5:0.5b"], control_port=True, token_delay=0.001)
    home = gateway_home(root, primary.port, backup.port, **kw)
    return Fleet(home, start_daemon(home), primary, backup)


def stop_fleet(fleet: Fleet) -> None:
    stop(fleet.home)
    for p in (fleet.primary, fleet.backup):
        p.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = start_fleet(tmp_path / "home")
    yield f
    stop_fleet(f)

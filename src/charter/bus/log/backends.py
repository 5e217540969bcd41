"""Which log a Node opens: `[bus] backend` in charter.toml."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charter.config import BusConfig


def open_log(bus: BusConfig, db_path: Path) -> Any:
    """The configured EventLog. `sqlite` opens the file now; `nats` connects on first use."""
    if bus.backend == "nats":
        from charter.bus.log.nats import NatsLog

        creds = bus.nats_creds
        if creds is not None and not Path(creds).expanduser().is_absolute():
            creds = str(db_path.parent / creds)  # relative to CHARTER_HOME
        elif creds is None and bus.nats_agents:
            creds = str(db_path.parent / "nats" / "charter.creds")  # written by `charter nats setup`
        return NatsLog(bus.nats_url, bus.stream, creds=creds, replicas=bus.nats_replicas)
    from charter.bus.log.sqlite import SqliteLog

    return SqliteLog(db_path, synchronous=bus.synchronous)

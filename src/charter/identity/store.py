"""Where the registry lives: charter.db (one machine) or PostgreSQL (several daemons, one fleet)."""

from __future__ import annotations

from charter.config import Config, Home
from charter.identity.registry import CachedRegistry, Registry


def open_registry(home: Home, config: Config, *, listen: bool = True) -> CachedRegistry:
    """`Registry` on charter.db, or `PgRegistry` when `[store] backend = "postgres"`.

    `listen=False` for short-lived commands that read once (`charter run`): no listener thread.
    """
    if config.store.backend == "postgres":
        from charter.identity.registry_pg import PgRegistry

        return PgRegistry(config.store.postgres_dsn, listen=listen)
    return Registry(home.db_path, synchronous=config.bus.synchronous)

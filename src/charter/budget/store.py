"""Which budget ledger a Node opens: `[store] backend` in charter.toml."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charter.config import Config, Home


def open_ledger(home: Home, config: Config) -> Any:
    """`Ledger` on budget.db (one machine), or `PgLedger` on PostgreSQL (several daemons, one budget)."""
    if config.store.backend == "postgres":
        from charter.budget.pg import PgLedger

        return PgLedger(config.store.postgres_dsn, timezone=config.budget.timezone, pool_size=config.store.postgres_pool)
    from charter.budget.ledger import Ledger
    from charter.budget.relocate import move_ledger

    move_ledger(home.db_path, home.budget_db_path)  # a home from before budget.db
    return Ledger(home.budget_db_path, timezone=config.budget.timezone, synchronous=config.bus.synchronous)

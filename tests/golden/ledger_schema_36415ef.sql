-- The ledger tables as Charter 36415ef (before budget.db) created them in charter.db: rowid tables,
-- the index reservations_held, no ledger_meta. Kept verbatim, to test moving a real older home.
CREATE TABLE IF NOT EXISTS budget_limits (
    scope      TEXT NOT NULL,
    unit       TEXT NOT NULL CHECK (unit IN ('usd', 'tokens')),
    period     TEXT NOT NULL CHECK (period IN ('hour', 'day', 'month', 'total')),
    hard       INTEGER NOT NULL CHECK (hard >= 0),
    soft_ratio REAL NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (scope, unit, period)
);
CREATE TABLE IF NOT EXISTS budget_usage (
    scope      TEXT NOT NULL,
    unit       TEXT NOT NULL,
    period     TEXT NOT NULL,
    period_key TEXT NOT NULL,
    reserved   INTEGER NOT NULL DEFAULT 0,
    committed  INTEGER NOT NULL DEFAULT 0,
    alerted    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, unit, period, period_key)
);
CREATE TABLE IF NOT EXISTS reservations (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    role        TEXT NOT NULL,
    model       TEXT NOT NULL,
    action      TEXT NOT NULL,
    usd         INTEGER NOT NULL,
    tokens      INTEGER NOT NULL,
    charges     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    closed_at   INTEGER,
    on_expiry   TEXT NOT NULL DEFAULT 'release'
);
CREATE INDEX IF NOT EXISTS reservations_held ON reservations (state, expires_at);
CREATE TABLE IF NOT EXISTS spend (
    id             INTEGER PRIMARY KEY,
    reservation_id TEXT NOT NULL,
    agent_id       TEXT NOT NULL,
    role           TEXT NOT NULL,
    model          TEXT NOT NULL,
    usd            INTEGER NOT NULL,
    tokens_in      INTEGER NOT NULL,
    tokens_out     INTEGER NOT NULL,
    ts             INTEGER NOT NULL,
    day            TEXT NOT NULL,
    overrun        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spend_ts ON spend (ts);

"""Budget periods aligned to the operator's time zone: hour, day, month, or the whole lifetime."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

PERIODS = ("hour", "day", "month", "total")


def period_key(period: str, now_ms: int, tz: ZoneInfo) -> str:
    """The key of the period containing `now_ms`, e.g. `2026-11-27` for a day in `tz`."""
    if period == "total":
        return "total"
    t = dt.datetime.fromtimestamp(now_ms / 1000, tz)
    if period == "hour":
        return t.strftime("%Y-%m-%dT%H")
    if period == "day":
        return t.strftime("%Y-%m-%d")
    if period == "month":
        return t.strftime("%Y-%m")
    raise ValueError(f"unknown period {period!r}; use one of {', '.join(PERIODS)}")

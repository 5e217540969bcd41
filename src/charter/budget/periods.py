"""Budget periods aligned to the operator's time zone: hour, day, month, or the whole lifetime."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

PERIODS = ("hour", "day", "month", "total")
_FORMATS = {"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}

# Every reservation and settlement asks for the key of each of its limits' periods: a datetime in
# the zone and a strftime each time, about 4 us apiece on a model call's path. A period starts on
# a whole second of UTC (zone offsets are whole seconds), so a key is the same for every instant
# of one second and is kept per (period, zone, second).
_cache: dict[tuple[str, ZoneInfo, int], str] = {}


def period_key(period: str, now_ms: int, tz: ZoneInfo) -> str:
    """The key of the period containing `now_ms`, e.g. `2026-11-27` for a day in `tz`."""
    if period == "total":
        return "total"
    cache_key = (period, tz, now_ms // 1000)
    hit = _cache.get(cache_key)
    if hit is not None:
        return hit
    fmt = _FORMATS.get(period)
    if fmt is None:
        raise ValueError(f"unknown period {period!r}; use one of {', '.join(PERIODS)}")
    key = dt.datetime.fromtimestamp(now_ms / 1000, tz).strftime(fmt)
    if len(_cache) > 256:
        _cache.clear()
    _cache[cache_key] = key
    return key

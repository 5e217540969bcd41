"""Human units in config and flags: durations (`90s`, `15m`, `2h`, `30d`) and sizes (`256MiB`)."""

from __future__ import annotations

import math
import re
from decimal import Decimal

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_DUR_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text`: a number of seconds, or compound units such as `1h30m`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise ValueError(f"{text!r} is not a duration")
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '15m', got {text!r}")
    s = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s or not math.isfinite(total):
        raise ValueError(f"{text!r} is not a duration; use e.g. '90s', '15m', '2h', '30d' or '1h30m'")
    return total


def parse_size(text: str | int) -> int:
    """Bytes in `text`: an integer, or a number with a unit such as `256MiB` or `1GB`."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected a size such as '256MiB', got {text!r}")
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size; use e.g. '65536', '64KiB', '256MiB' or '1GB'")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    # Positional notation, exact: parse_duration reads no exponents, and `:g` kept 6 digits only.
    return format(Decimal(repr(float(seconds))), "f").removesuffix(".0") + "s"

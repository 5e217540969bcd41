"""Canonical JSON: the bytes that signatures and hashes are computed over.

Sorted keys, no insignificant whitespace, UTF-8 (non-ASCII characters are not escaped), integers
within 64 bits, no NaN or infinities. orjson produces exactly this with OPT_SORT_KEYS, and it is
fast enough to sit on the bus's hot path (about a microsecond per envelope).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson

_CANON = orjson.OPT_SORT_KEYS
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class EncodingError(ValueError):
    """The value cannot be encoded canonically (a non-string key, a huge integer, NaN...)."""


def _non_finite(value: Any) -> bool:
    """True if a NaN or an infinity hides anywhere in `value` (a loop, not recursion: it is on every seal)."""
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        v = pop()
        if isinstance(v, float):
            if v - v != 0.0:  # inf - inf and NaN - NaN are NaN; any finite float gives 0.0
                return True
        elif isinstance(v, dict):
            extend(v.values())
        elif isinstance(v, (list, tuple)):
            extend(v)
    return False


def canonical(value: Any, *, finite: bool = False) -> bytes:
    """Encode `value` as canonical JSON bytes.

    `finite=True` skips the NaN check, for a value whose every float was just checked (an envelope
    whose unsigned part was encoded a moment before, now with its signature added).
    """
    try:
        data = orjson.dumps(value, option=_CANON)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise EncodingError(str(exc)) from exc
    # orjson writes NaN and infinities as `null`; refuse them rather than change the value.
    if not finite and b"null" in data and _non_finite(value):
        raise EncodingError("NaN and infinities have no JSON form")
    return data


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises EncodingError (never anything else) on bad input."""
    try:
        return orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise EncodingError(str(exc)) from exc


def dumps(value: Any) -> bytes:
    """Compact JSON for responses and files (not canonical: key order kept)."""
    return orjson.dumps(value)


def b64e(data: bytes) -> str:
    """Unpadded URL-safe base64, the encoding of every key, signature and nonce on the wire."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Decode unpadded URL-safe base64; raises ValueError on anything else."""
    if not isinstance(text, str) or len(text) > 4096 or not _B64URL.fullmatch(text):
        raise ValueError("not an unpadded base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unpadded base64url string") from exc


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

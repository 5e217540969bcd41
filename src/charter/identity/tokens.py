"""Invite tokens: 192 random bits, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hmac
import os
import re

from charter.encoding import b64e, sha256_hex

PREFIX = "chi_"
_TOKEN = re.compile(r"chi_[A-Za-z0-9_-]{32}")


def new_token() -> str:
    return PREFIX + b64e(os.urandom(24))


def token_hash(token: str) -> str:
    return sha256_hex(token.encode("utf-8"))


def looks_like_token(token: str) -> bool:
    return bool(_TOKEN.fullmatch(token))


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


API_KEY_PREFIX = "chk_"


def new_api_key() -> str:
    """A bearer key for OpenAI/Ollama clients: 192 random bits, shown once, stored as a hash."""
    return API_KEY_PREFIX + b64e(os.urandom(24))

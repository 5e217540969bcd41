"""Signed HTTP requests: how an agent (or the operator) proves who is calling, without a secret on the wire.

    Authorization: Charter id=<agent id or "operator">,ts=<ms>,nonce=<base64url>,sig=<base64url>

The signature covers `METHOD \\n path?query \\n ts \\n nonce \\n SHA-256(body) hex`. The same replay
window as the bus applies, and a nonce is accepted once.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from charter.bus.replay import ReplayGuard
from charter.encoding import b64d, b64e, sha256_hex
from charter.errors import (
    BAD_SIGNATURE,
    EXPIRED,
    REPLAY,
    REVOKED,
    SUSPENDED,
    UNAUTHORIZED,
    UNKNOWN_SENDER,
    CharterError,
)
from charter.identity.keys import SigningKey
from charter.identity.registry import AgentRecord

SCHEME = "Charter"
_HEADER = re.compile(
    r"Charter id=([A-Za-z0-9_.-]{1,64}),ts=(\d{1,16}),nonce=([A-Za-z0-9_-]{16,64}),sig=([A-Za-z0-9_-]{86})"
)


def _message(method: str, target: str, ts: str, nonce: str, body: bytes) -> bytes:
    return f"{method.upper()}\n{target}\n{ts}\n{nonce}\n{sha256_hex(body)}".encode()


def sign_request(key: SigningKey, signer: str, method: str, target: str, body: bytes = b"") -> str:
    """The Authorization header value for one request. `target` is the path with its query."""
    ts = str(time.time_ns() // 1_000_000)
    nonce = b64e(os.urandom(16))
    sig = key.sign_b64(_message(method, target, ts, nonce, body))
    return f"{SCHEME} id={signer},ts={ts},nonce={nonce},sig={sig}"


def verify_request(
    header: str | None,
    method: str,
    target: str,
    body: bytes,
    lookup: Callable[[str], AgentRecord | None],
    guard: ReplayGuard,
) -> AgentRecord:
    """The proven caller, or CharterError with the same codes the bus uses."""
    if not header:
        raise CharterError(UNAUTHORIZED, "this call needs a signed request (Authorization: Charter ...)", "authorization")
    m = _HEADER.fullmatch(header.strip())
    if not m:
        raise CharterError(UNAUTHORIZED, "Authorization header is not a Charter signature", "authorization")
    signer, ts, nonce, sig = m.groups()
    agent = lookup(signer)
    if agent is None:
        raise CharterError(UNKNOWN_SENDER, f"no enrolled agent has id {signer!r}", "authorization")
    if agent.status == "revoked":
        raise CharterError(REVOKED, f"agent {agent.name} was revoked", "authorization")
    if agent.status == "suspended":
        raise CharterError(SUSPENDED, f"agent {agent.name} is suspended", "authorization")
    now = time.time_ns() // 1_000_000
    if now >= agent.expires_at:
        raise CharterError(EXPIRED, f"agent {agent.name}'s charter expired", "authorization")
    if not agent.public_key.verify(b64d(sig), _message(method, target, ts, nonce, body)):
        raise CharterError(BAD_SIGNATURE, "request signature does not match the caller's key", "authorization")
    why = guard.check(signer, nonce, int(ts), now)
    if why:
        raise CharterError(REPLAY, why, "authorization")
    return agent

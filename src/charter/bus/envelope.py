"""The envelope: `{v, id, subject, sender, ts, nonce, kind, payload, sig}`.

The signature covers the canonical JSON of every other field. `parse` is the one door from bytes
into an Envelope: it raises `Rejection` (`too_large` or `malformed`) and nothing else, whatever it
is given; the property tests hold it to that.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ulid import ULID

from charter.bus.subjects import SubjectError, validate_subject
from charter.encoding import EncodingError, b64e, canonical, loads
from charter.errors import MALFORMED, TOO_LARGE, Rejection

if TYPE_CHECKING:
    from charter.identity.keys import SigningKey

VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024
FIELDS = frozenset({"v", "id", "subject", "sender", "ts", "nonce", "kind", "payload", "sig"})

_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_SENDER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SIG = re.compile(r"[A-Za-z0-9_-]{86}")
_MAX_TS = 2**53


@dataclass(frozen=True, slots=True)
class Envelope:
    v: int
    id: str
    subject: str
    sender: str
    ts: int
    nonce: str
    kind: str
    payload: Any
    sig: str
    signed: bytes  # canonical bytes of every field but `sig`: what the signature covers
    raw: bytes  # canonical bytes of the whole envelope: what the log stores and hashes

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v, "id": self.id, "subject": self.subject, "sender": self.sender,
            "ts": self.ts, "nonce": self.nonce, "kind": self.kind, "payload": self.payload,
            "sig": self.sig,
        }


def _bad(msg: str, where: str | None = None) -> Rejection:
    return Rejection(MALFORMED, msg, where)


def _check_fields(eid: Any, subject: Any, sender: Any, ts: Any, nonce: Any, kind: Any) -> str:
    """The header fields' checks, shared by `from_dict` and `seal`; returns the subject."""
    if not isinstance(eid, str) or not _ULID.fullmatch(eid):
        raise _bad("id must be a ULID (26 Crockford base32 characters)", "id")
    try:
        subject = validate_subject(subject)
    except SubjectError as exc:
        raise _bad(str(exc), "subject") from None
    if not isinstance(sender, str) or not _SENDER.fullmatch(sender):
        raise _bad("sender must be an agent id", "sender")
    if type(ts) is not int or not 0 < ts < _MAX_TS:
        raise _bad("ts must be an integer of milliseconds since the Unix epoch", "ts")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise _bad("nonce must be 16 to 64 base64url characters", "nonce")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise _bad("kind must be a lowercase token such as 'event'", "kind")
    return subject


def from_dict(obj: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Validate a decoded JSON object as an envelope."""
    if not isinstance(obj, dict):
        raise _bad("an envelope is a JSON object")
    keys = obj.keys()
    if keys != FIELDS:
        missing = sorted(FIELDS - keys)
        extra = sorted(str(k) for k in keys - FIELDS)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise _bad("envelope fields: " + "; ".join(parts))
    v = obj["v"]
    if v != VERSION or type(v) is not int:
        raise _bad(f"unsupported envelope version {v!r}; this bus speaks v{VERSION}", "v")
    eid, sender, ts, nonce, kind = obj["id"], obj["sender"], obj["ts"], obj["nonce"], obj["kind"]
    subject = _check_fields(eid, obj["subject"], sender, ts, nonce, kind)
    sig = obj["sig"]
    if not isinstance(sig, str) or not _SIG.fullmatch(sig):
        raise _bad("sig must be an Ed25519 signature in unpadded base64url", "sig")
    unsigned = {k: obj[k] for k in obj if k != "sig"}
    try:
        signed = canonical(unsigned)
    except EncodingError as exc:
        raise _bad(f"payload cannot be encoded canonically: {exc}", "payload") from None
    raw = canonical(obj, finite=True)  # `signed` checked every value but sig, a string
    if len(raw) > max_bytes:
        raise Rejection(TOO_LARGE, f"envelope is {len(raw)} bytes; the limit is {max_bytes}")
    return Envelope(VERSION, eid, subject, sender, ts, nonce, kind, obj["payload"], sig, signed, raw)


def parse(data: bytes | bytearray | memoryview | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Parse wire bytes into an Envelope. Raises Rejection(too_large|malformed), nothing else."""
    try:
        size = len(data)
    except TypeError:
        raise _bad("an envelope is JSON text") from None
    if size > max_bytes:
        raise Rejection(TOO_LARGE, f"envelope is {size} bytes; the limit is {max_bytes}")
    try:
        obj = loads(bytes(data) if isinstance(data, (bytearray, memoryview)) else data)
    except EncodingError as exc:
        raise _bad(f"not valid JSON: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the contract is "Rejection or nothing"
        raise _bad(f"not valid JSON: {exc}") from None
    return from_dict(obj, max_bytes=max_bytes)


def new_nonce() -> str:
    return b64e(os.urandom(16))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seal(
    key: SigningKey,
    *,
    sender: str,
    subject: str,
    payload: Any,
    kind: str = "event",
    ts: int | None = None,
    nonce: str | None = None,
    eid: str | None = None,
) -> Envelope:
    """Build and sign an envelope, checked as `parse` checks one, so a bad one fails here, not on the bus.

    Every call event and decision is sealed on the gateway's path, so the canonical bytes are encoded
    once each: what is signed (with the NaN check) and, with the signature added, what is stored.
    """
    eid = eid or str(ULID())
    ts = now_ms() if ts is None else ts
    nonce = nonce or new_nonce()
    subject = _check_fields(eid, subject, sender, ts, nonce, kind)
    unsigned = {"v": VERSION, "id": eid, "subject": subject, "sender": sender, "ts": ts, "nonce": nonce,
                "kind": kind, "payload": payload}
    try:
        signed = canonical(unsigned)
    except EncodingError as exc:
        raise _bad(f"payload cannot be encoded canonically: {exc}", "payload") from None
    sig = key.sign_b64(signed)
    unsigned["sig"] = sig
    raw = canonical(unsigned, finite=True)  # the values checked just above, and sig, a string
    return Envelope(VERSION, eid, subject, sender, ts, nonce, kind, payload, sig, signed, raw)

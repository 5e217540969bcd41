"""Errors with stable codes, shared by the bus, the daemon, the SDK and the CLI.

Every refusal names its reason with a code that scripts can match on and a message that a person
can act on. The codes are part of the wire contract: never rename one.
"""

from __future__ import annotations

from typing import Any

# Rejection codes of the verification pipeline, in the order the pipeline checks them.
MALFORMED = "malformed"
TOO_LARGE = "too_large"
UNKNOWN_SENDER = "unknown_sender"
SUSPENDED = "suspended"
REVOKED = "revoked"
EXPIRED = "expired"
BAD_SIGNATURE = "bad_signature"
REPLAY = "replay"
OUT_OF_SCOPE = "out_of_scope"
POLICY_DENIED = "policy_denied"

# Codes outside the bus pipeline.
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
BAD_TOKEN = "bad_token"
SANDBOX_ESCAPE = "sandbox_escape"
QUOTA_EXCEEDED = "quota_exceeded"
BAD_REQUEST = "bad_request"
LEDGER_CLOSED = "ledger_closed"

HTTP_STATUS: dict[str, int] = {
    MALFORMED: 400,
    BAD_REQUEST: 400,
    TOO_LARGE: 413,
    UNKNOWN_SENDER: 401,
    BAD_SIGNATURE: 401,
    UNAUTHORIZED: 401,
    BAD_TOKEN: 403,
    SUSPENDED: 403,
    REVOKED: 403,
    EXPIRED: 403,
    OUT_OF_SCOPE: 403,
    POLICY_DENIED: 403,
    SANDBOX_ESCAPE: 403,
    NOT_FOUND: 404,
    REPLAY: 409,
    CONFLICT: 409,
    QUOTA_EXCEEDED: 507,
    "budget_exceeded": 402,
    "log_unavailable": 503,  # the log's server (NATS JetStream) did not answer; nothing was appended
    LEDGER_CLOSED: 503,  # the daemon is stopping; nothing was reserved or booked
    "approval_required": 202,
}


class CharterError(Exception):
    """A failure with a stable code, a human message and, where it helps, the place it happened."""

    def __init__(self, code: str, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.where = where
        self.details: dict[str, Any] | None = None

    def with_details(self, details: dict[str, Any]) -> CharterError:
        """Attach machine-readable context (e.g. what a budget refusal asked and what is left)."""
        self.details = details
        return self

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.where:
            body["where"] = self.where
        if self.details:
            body["details"] = self.details
        return body

    def __str__(self) -> str:
        where = f" (at {self.where})" if self.where else ""
        return f"{self.code}: {self.message}{where}"


class Rejection(CharterError):
    """The bus refused an envelope. Nothing was appended."""


class ConfigError(CharterError):
    """charter.toml (or a file it names) is invalid; `where` names the file and the key."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__("config", message, where)

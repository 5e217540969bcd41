"""The id of the HTTP request being served, so logs and the events it causes can be joined."""

from __future__ import annotations

import os
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("charter_request_id", default=None)


def new_request_id() -> str:
    return os.urandom(8).hex()

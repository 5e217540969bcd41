"""What every command shares: the home, output in text or JSON, errors and exit codes."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from rich.console import Console

from charter.config import Home
from charter.errors import CharterError

# Exit codes scripts can trust.
OK = 0
ERROR = 1  # something went wrong (the message says what)
USAGE = 2  # bad flags or arguments (typer/click use 2 as well)
UNREACHABLE = 3  # no daemon answering, or not initialised
REFUSED = 4  # the daemon refused: a rejection code such as out_of_scope, or not found
VERIFY_FAILED = 5  # a verification found tampering

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

T = TypeVar("T")


class State:
    home: Home = Home.resolve()


state = State()

_REFUSAL_CODES = {
    "malformed", "too_large", "unknown_sender", "suspended", "revoked", "expired", "bad_signature",
    "replay", "out_of_scope", "policy_denied", "unauthorized", "not_found", "conflict", "bad_token",
    "sandbox_escape", "quota_exceeded", "bad_request",
}


def fail(exc: CharterError | str, code: int | None = None) -> NoReturn:
    if isinstance(exc, CharterError):
        where = f" [dim](at {exc.where})[/dim]" if exc.where else ""
        err.print(f"[bold red]error[/bold red] [red]{exc.code}[/red]: {escape(exc.message)}{where}")
        if code is None:
            if exc.code in ("unreachable", "not_running", "config", "not_initialised"):
                code = UNREACHABLE if exc.code != "config" else ERROR
            elif exc.code in _REFUSAL_CODES:
                code = REFUSED
            else:
                code = ERROR
    else:
        err.print(f"[bold red]error[/bold red]: {escape(exc)}")
    raise SystemExit(ERROR if code is None else code)


def escape(text: str) -> str:
    from rich.markup import escape as _e

    return _e(text)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async body, turning CharterError into a message and an exit code."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except CharterError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def ms_iso(ms: int | None) -> str:
    if not ms:
        return "-"
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")

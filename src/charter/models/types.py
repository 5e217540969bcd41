"""The gateway's own shapes, between the client's API (OpenAI or Ollama) and any backend.

Every backend is driven as a stream, even for a non-streaming client: the first-token and idle
timeouts then apply to every call, and a failure before the first token can fail over unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)  # Ollama `options` passed through

    def prompt_chars(self) -> int:
        total = 0
        for m in self.messages:
            c = m.get("content")
            if isinstance(c, str):
                total += len(c.encode())
            elif isinstance(c, list):
                total += sum(len(str(p.get("text", "")).encode()) for p in c if isinstance(p, dict))
        return total

    def estimated_prompt_tokens(self) -> int:
        """An upper bound for the reservation: about two bytes a token (English runs near four)."""
        return self.prompt_chars() // 2 + 4 * len(self.messages) + 1


@dataclass(slots=True)
class Final:
    """The end of a backend's stream: why it stopped and what it used."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    raw: dict[str, Any] = field(default_factory=dict)  # backend-specific extras (Ollama durations)


class BackendError(Exception):
    """A backend failed. `kind` says how, for the breaker and the call event."""

    # kinds that mean "this backend is down": the circuit opens at once
    HARD = frozenset({"refused", "connect_timeout", "first_token_timeout", "unreachable"})

    def __init__(self, kind: str, message: str, *, status: int | None = None, usage: Final | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        # What the backend said it used, when its failed answer still reported it (an empty one).
        self.usage = usage
        # The backend had accepted the request (its HTTP 200 answer had begun): it read the prompt,
        # and a paid API bills it, whatever came of the answer.
        self.answered = False

    def after_answer(self, answered: bool) -> BackendError:
        """This error, marked as raised once the backend's answer had begun (if it had)."""
        self.answered = self.answered or answered
        return self

    @property
    def hard(self) -> bool:
        return self.kind in self.HARD

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(slots=True)
class Attempt:
    """One rung of the chain as it was tried, for the call event and the response metadata."""

    ref: str
    outcome: str  # ok | skipped | failed
    reason: str = ""
    ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "outcome": self.outcome, "reason": self.reason, "ms": round(self.ms, 2)}

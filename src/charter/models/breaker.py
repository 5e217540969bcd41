"""A circuit breaker per backend: closed, open, half-open.

A backend that refuses connections or never sends a first token opens its circuit at once, so no
request pays twice for a dead backend (LiteLLM keeps trying the dead Ollama first). Softer failures
(HTTP 500, an empty answer, a broken stream) open it after `failures` in a row. While open, the
cooldown doubles up to a cap; after it, one trial (a request or a probe) is let through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Breaker:
    name: str
    threshold: int = 3
    base_cooldown: float = 5.0
    max_cooldown: float = 120.0
    state: str = CLOSED
    failures: int = 0
    cooldown: float = 0.0
    opened_at: float = 0.0
    last_reason: str = ""
    trial_started: float = 0.0
    changed_at: float = field(default_factory=time.time)

    def allow(self, now: float | None = None) -> bool:
        """May a request try this backend now? In half-open, one trial at a time."""
        now = time.monotonic() if now is None else now
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self.opened_at >= self.cooldown:
                self._set(HALF_OPEN)
                self.trial_started = now
                return True
            return False
        # half-open: one trial in flight; if it vanished (cancelled), allow another after a while
        if now - self.trial_started > max(self.cooldown, 5.0):
            self.trial_started = now
            return True
        return False

    def success(self) -> str | None:
        """Record a success; returns the old state if the circuit closed because of it."""
        old = self.state
        self.failures = 0
        self.cooldown = 0.0
        self.last_reason = ""
        if old != CLOSED:
            self._set(CLOSED)
            return old
        return None

    def failure(self, reason: str, hard: bool, now: float | None = None) -> str | None:
        """Record a failure; returns the new state if the circuit opened (or stayed open longer)."""
        now = time.monotonic() if now is None else now
        self.failures += 1
        self.last_reason = reason
        if self.state == HALF_OPEN or (self.state == OPEN and now - self.opened_at >= self.cooldown):
            self.cooldown = min(max(self.cooldown * 2, self.base_cooldown), self.max_cooldown)
            self.opened_at = now
            self._set(OPEN)
            return OPEN
        if self.state == CLOSED and (hard or self.failures >= self.threshold):
            self.cooldown = self.base_cooldown
            self.opened_at = now
            self._set(OPEN)
            return OPEN
        return None

    def _set(self, state: str) -> None:
        self.state = state
        self.changed_at = time.time()

    def retry_in(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return max(0.0, self.opened_at + self.cooldown - now) if self.state == OPEN else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"backend": self.name, "state": self.state, "failures": self.failures,
                "cooldown_s": self.cooldown, "retry_in_s": round(self.retry_in(), 2),
                "last_reason": self.last_reason, "changed_at": self.changed_at}

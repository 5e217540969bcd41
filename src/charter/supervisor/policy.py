"""Restart policy: exponential backoff with a cap, and a start limit per window. Never a restart loop.

`RestartPolicy.decide(now)` answers before every automatic restart: wait `delay` seconds and
restart, or stop: the start limit (`start_limit_burst` restarts within `start_limit_interval`, as
systemd's StartLimitBurst / StartLimitIntervalSec) is reached, and the service becomes `failed`.
A failed service is not restarted again by itself; it is still checked, but it leaves `failed` only
by the operator (`charter services restart`, `reset` or `start`), which also clears the counters, as
`systemctl reset-failed` does. The window's history expires by time alone: passing checks never
clear it, or a service that flaps outside Charter would earn a fresh burst each time it passed.

The backoff grows with consecutive restarts (base, 2 base, 4 base, ... up to cap) and resets once
the service has been passing for `reset_after`, as Kubernetes' CrashLoopBackOff does after ten
minutes of clean running. All times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from charter.supervisor.specs import RestartConfig


@dataclass(frozen=True, slots=True)
class Decision:
    restart: bool
    delay: float  # seconds to wait before the restart (0 when not restarting)
    attempt: int  # which consecutive restart this would be (1 = the first)
    reason: str


@dataclass
class RestartPolicy:
    config: RestartConfig
    consecutive: int = 0  # restarts since the service last passed for reset_after
    starts: deque[float] = field(default_factory=deque)  # when each automatic restart happened
    passing_since: float | None = None

    def delay_for(self, attempt: int) -> float:
        """Backoff before restart number `attempt` (1-based): base * 2^(attempt-1), capped."""
        c = self.config
        return min(c.base * (2 ** min(attempt - 1, 62)), c.cap)

    def _prune(self, now: float) -> None:
        window = self.config.start_limit_interval
        while self.starts and now - self.starts[0] >= window:
            self.starts.popleft()

    def decide(self, now: float) -> Decision:
        self._prune(now)
        c = self.config
        if len(self.starts) >= c.start_limit_burst:
            return Decision(False, 0.0, self.consecutive + 1,
                            f"start limit reached: {len(self.starts)} restarts within {c.start_limit_interval:g}s "
                            f"(start_limit_burst = {c.start_limit_burst})")
        attempt = self.consecutive + 1
        delay = self.delay_for(attempt)
        return Decision(True, delay, attempt, f"restart {attempt} after {delay:g}s backoff")

    def started(self, now: float) -> None:
        """An automatic restart happened now."""
        self.consecutive += 1
        self.starts.append(now)
        self.passing_since = None

    def passing(self, now: float) -> None:
        """The service passed its check; enough of that in a row resets the backoff."""
        if self.passing_since is None:
            self.passing_since = now
        elif now - self.passing_since >= self.config.reset_after:
            self.consecutive = 0

    def not_passing(self) -> None:
        self.passing_since = None

    def reset(self) -> None:
        """The operator's restart or reset (never a passing check): counters and window start over."""
        self.consecutive = 0
        self.starts.clear()
        self.passing_since = None

    def to_dict(self, now: float) -> dict[str, object]:
        self._prune(now)
        return {"consecutive": self.consecutive, "in_window": len(self.starts),
                "start_limit_burst": self.config.start_limit_burst,
                "start_limit_interval_s": self.config.start_limit_interval}


@dataclass
class Thresholds:
    """Consecutive results before a state changes (Consul's success_before_passing / failures_before_critical)."""

    successes_before_passing: int = 1
    failures_before_critical: int = 1
    ok_run: int = 0
    fail_run: int = 0

    def observe(self, ok: bool) -> None:
        if ok:
            self.ok_run += 1
            self.fail_run = 0
        else:
            self.fail_run += 1
            self.ok_run = 0

    @property
    def passing(self) -> bool:
        return self.ok_run >= self.successes_before_passing

    @property
    def critical(self) -> bool:
        return self.fail_run >= self.failures_before_critical

"""Replay protection: a timestamp window, and every nonce seen inside it remembered.

A nonce is remembered until its envelope's timestamp leaves the window; after that the timestamp
check alone refuses a replay, so memory stays bounded by the traffic of one window.
"""

from __future__ import annotations

import heapq
import time


class ReplayGuard:
    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[int, str, str]] = []

    def _prune(self, now: int) -> None:
        exp = self._expiry
        while exp and exp[0][0] < now:
            _, sender, nonce = heapq.heappop(exp)
            self._seen.discard((sender, nonce))

    def check(self, sender: str, nonce: str, ts: int, now: int | None = None) -> str | None:
        """None if fresh (and the nonce is now taken); otherwise the reason it is a replay."""
        now = time.time_ns() // 1_000_000 if now is None else now
        skew = ts - now
        if skew > self.window_ms or -skew > self.window_ms:
            return f"timestamp is {abs(skew) / 1000:.1f}s {'ahead of' if skew > 0 else 'behind'} the bus clock; the window is {self.window_ms / 1000:g}s"
        self._prune(now)
        key = (sender, nonce)
        if key in self._seen:
            return "this nonce was already used by this sender"
        self._seen.add(key)
        heapq.heappush(self._expiry, (ts + self.window_ms, sender, nonce))
        return None

    def release(self, sender: str, nonce: str) -> None:
        """Forget a nonce whose envelope was not appended after all (it may be sent again)."""
        self._seen.discard((sender, nonce))

    def remember(self, sender: str, nonce: str, ts: int) -> None:
        key = (sender, nonce)
        if key not in self._seen:
            self._seen.add(key)
            heapq.heappush(self._expiry, (ts + self.window_ms, sender, nonce))

    def __len__(self) -> int:
        return len(self._seen)

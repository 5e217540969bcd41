"""The last rung: an honest answer that says what is down, and recent answers to identical prompts.

It never pretends to be a model. When a cached answer to the very same conversation exists it is
offered, marked as such; otherwise the answer names each backend that failed and why.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from charter.encoding import canonical, sha256_hex


def prompt_key(alias: str, messages: list[dict[str, Any]]) -> str:
    return sha256_hex(canonical({"alias": alias, "messages": messages}))


class AnswerCache:
    """The last N good answers by (alias, messages), least recently used out first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def put(self, key: str, answer: str, ref: str) -> None:
        if self.size <= 0 or not answer:
            return
        self._items[key] = (answer, ref)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, key: str) -> tuple[str, str] | None:
        hit = self._items.get(key)
        if hit:
            self._items.move_to_end(key)
        return hit


def degraded_answer(failures: list[tuple[str, str]], cached: tuple[str, str] | None) -> str:
    down = "; ".join(f"{ref}: {why}" for ref, why in failures) or "no backend could be tried"
    if cached:
        answer, ref = cached
        return (f"[Charter degraded mode: every model is unavailable ({down}). "
                f"This is a cached answer from {ref} to the same prompt.]\n\n{answer}")
    return (f"[Charter degraded mode] No model can answer right now. What is down: {down}. "
            "Charter keeps probing and will route to the first backend that recovers; try again shortly.")

"""Model prices: USD per million input and output tokens. Local models cost 0; their tokens still count."""

from __future__ import annotations

import math
from dataclasses import dataclass

from charter.bus.subjects import matches

MICRO = 1_000_000  # the ledger counts micro-dollars: integers, so sums are exact


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float

    def cost_micros(self, tokens_in: int, tokens_out: int) -> int:
        """Cost in micro-dollars, rounded up: a budget is never under-charged."""
        # USD = tokens * price_per_mtok / 1e6, so micro-dollars = tokens * price_per_mtok.
        return math.ceil(tokens_in * self.input_per_mtok + tokens_out * self.output_per_mtok)


FREE = Price(0.0, 0.0)


class PriceTable:
    """Model names (`provider/model`) or patterns with `*` and `>` over `provider.model` tokens."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self.prices = prices

    def price(self, model: str) -> Price:
        if model in self.prices:
            return self.prices[model]
        if model.startswith("ollama/") or model == "degraded":
            return FREE
        key = model.replace("/", ".").replace(":", "_")
        for pattern, price in self.prices.items():
            if ("*" in pattern or ">" in pattern) and matches(pattern.replace("/", "."), key):
                return price
        if "*" in self.prices:
            return self.prices["*"]
        raise KeyError(f"no price for model {model!r}; add it under [prices] in charter.toml")

    def free_models(self) -> list[str]:
        return sorted(m for m, p in self.prices.items() if p == FREE and "*" not in m and ">" not in m)

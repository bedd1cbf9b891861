"""Model price table (USD per 1M tokens) and cost computation for generations."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._types import Cost, Usage

# List prices in USD per 1M tokens. The local model is priced like a small hosted model so
# the demo's cost figures look like a real deployment's.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "local-extractive-1": {"input": 0.15, "output": 0.60},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1": {"input": 2.00, "output": 8.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    "gpt-3.5-turbo": {"input": 0.50, "output": 1.50},
}

# Providers answer with dated snapshots ("gpt-4o-mini-2024-07-18"); price them as the base model.
_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$|-\d{4}$")


class PriceTable:
    """Looks up a model's prices and turns token usage into a `Cost`."""

    def __init__(self, overrides: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self._prices = {name: dict(p) for name, p in DEFAULT_PRICES.items()}
        for name, prices in (overrides or {}).items():
            self._prices[name] = {"input": prices["input"], "output": prices["output"]}

    def prices_for(self, model: str) -> dict[str, float] | None:
        """Prices of `model` (exact name, then without a date suffix), or None if unknown."""
        for candidate in (model, _DATE_SUFFIX.sub("", model)):
            if candidate in self._prices:
                return self._prices[candidate]
        return None

    def cost(self, model: str, usage: Usage) -> Cost | None:
        """USD cost of `usage` on `model`, or None when the model has no known price."""
        prices = self.prices_for(model)
        if prices is None:
            return None
        cost_in = usage["input"] * prices["input"] / 1_000_000
        cost_out = usage["output"] * prices["output"] / 1_000_000
        return Cost(input=cost_in, output=cost_out, total=cost_in + cost_out)

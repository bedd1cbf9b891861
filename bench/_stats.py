"""Small statistics helpers (medians and nearest-rank percentiles)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """Median, p99 and mean of nanosecond samples, in microseconds."""
    us = [s / 1000.0 for s in samples_ns]
    return {"median_us": round(median(us), 2), "p99_us": round(percentile(us, 99), 2),
            "mean_us": round(statistics.fmean(us), 2) if us else math.nan, "samples": len(us)}

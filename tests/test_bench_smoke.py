"""The benchmark harness itself still runs (a tiny run; figures come from `make bench`)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_bench_smoke():
    """A tiny benchmark run completes and every traced generation is delivered."""
    import bench

    bench.smoke()

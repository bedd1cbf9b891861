"""Benchmarks for celery-langfuse: ``python -m bench`` (``make bench``).

Measures, on one machine in one invocation, the throughput of real prefork workers on real
Redis with five tracing implementations side by side, the in-process cost of
``instrument()``, the spool, the shipper, delivery latency, memory and backlog recovery.
See ``bench/runner.py`` for the order of runs and ``bench/report.py`` for the targets.
"""

from __future__ import annotations

from typing import Any

__all__ = ["smoke"]


def smoke() -> list[dict[str, Any]]:
    """A < 60 s end-to-end run of every measurement at toy sizes; returns its records.

    Meant for a test: it checks that the benchmark still runs (workers start, spans arrive,
    the shipper drains), not how fast anything is.
    """
    from bench.runner import Settings, run

    settings = Settings.quick(
        tasks=40, impls=("untraced", "observe+shutdown_flush", "celery-langfuse"),
        latency_tasks=20, latency_rate=50.0, memory_first=50, memory_tasks=150,
        overhead_iterations=200, spool_spans=1000, ship_targets=("sink", "discard"),
        backlog_max_spans=1000,
    )
    records = run(settings)
    benches = {r["bench"] for r in records}
    missing = {"throughput", "delivery_latency", "memory", "task_overhead", "spool_costs",
               "shipper", "backlog"} - benches
    if missing:
        raise AssertionError(f"benchmark smoke run produced no {sorted(missing)} records")
    traced = next(r for r in records if r["bench"] == "throughput"
                  and r["impl"] == "celery-langfuse")
    if traced["delivered_after_drain_min"] != traced["expected_generations"]:
        raise AssertionError(f"celery-langfuse lost generations in the smoke run: {traced}")
    return records

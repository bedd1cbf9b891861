"""Delivery latency, task end → received, with a healthy receiver (no added latency).

A worker running ``instrument()`` gets tasks at a steady rate (not a flood: this is the
delay a healthy system adds, not a queue draining). For every task observation, the latency
is the receiver's arrival time minus the span's end time. The two clocks differ: the span's
``end_time`` is wall-clock (``time.time_ns()`` in the pool child), ``Observation.received_at``
is ``time.monotonic()`` in this process, so it is converted to wall-clock with an offset
sampled here (same machine, same wall clock).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench._stats import median, percentile
from bench.apps._common import TASK_NAME
from bench.throughput import WARMUP_TASKS, Harness, run_tasks

IMPL_MODULE = "bench.apps.instrumented"


def measure(harness: Harness, tasks: int, rate: float, work_ms: float,
            timeout: float = 60.0) -> dict[str, Any]:
    from bench._procs import Worker

    receiver = harness.receiver
    receiver.reset_faults()
    receiver.clear()
    queue = f"bench-latency-{uuid.uuid4().hex[:6]}"
    worker = Worker(IMPL_MODULE, harness.worker_env(queue, harness.scratch / f"spool-{queue}"))
    producer = harness.producer()
    try:
        worker.wait_ready()
        run_tasks(producer, queue, range(-WARMUP_TASKS, 0), work_ms)
        receiver.wait_for(lambda obs: _count(obs) >= WARMUP_TASKS, timeout=timeout,
                          what="warm-up task observations")
        receiver.clear()
        task_ids = _paced(producer, queue, tasks, rate, work_ms)
        receiver.wait_for(lambda obs: _count(obs) >= tasks, timeout=timeout,
                          what=f"{tasks} task observations")
        offset = time.time() - time.monotonic()
        worker.stop()
    finally:
        worker.kill()
        producer.close()
    wanted = set(task_ids)
    latencies = [
        obs.received_at + offset - obs.end_time.timestamp()
        for obs in _first_copies(receiver.observations)
        if obs.name == TASK_NAME and obs.metadata.get("task_id") in wanted and obs.end_time
    ]
    ms = [s * 1000.0 for s in latencies]
    return {"tasks": tasks, "rate_per_s": rate, "received": len(ms),
            "p50_ms": round(median(ms), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else None}


def _paced(producer: Any, queue: str, tasks: int, rate: float, work_ms: float) -> list[str]:
    """Send ``tasks`` at ``rate`` per second; wait for every result; return the task ids."""
    started = time.monotonic()
    results = []
    for i in range(tasks):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        results.append(producer.send_task(TASK_NAME, args=[i, work_ms], queue=queue))
    for result in results:
        result.get(timeout=60)
    return [r.id for r in results]


def _count(observations: list[Any]) -> int:
    return len({o.id for o in observations if o.name == TASK_NAME})


def _first_copies(observations: list[Any]) -> list[Any]:
    seen: set[str] = set()
    first = []
    for obs in observations:
        if obs.id not in seen:
            seen.add(obs.id)
            first.append(obs)
    return first

"""Worker memory: RSS of the main process and of each pool child after 1k and after N tasks.

Tasks run without the 5 ms wait (``work_ms=0``): memory growth is per task, not per second,
and the run is shorter. Read from ``/proc/<pid>/status`` (``VmRSS``). The untraced app runs
the same tasks as a baseline, so growth of Celery's own can be told apart from ours.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench._procs import Worker
from bench.throughput import IMPLEMENTATIONS, Harness, run_tasks

CHUNK = 1000


def measure(harness: Harness, impl: str, first: int, total: int) -> dict[str, Any]:
    queue = f"bench-mem-{uuid.uuid4().hex[:6]}"
    harness.receiver.reset_faults()
    harness.receiver.clear()
    worker = Worker(IMPLEMENTATIONS[impl],
                    harness.worker_env(queue, harness.scratch / f"spool-{queue}"))
    producer = harness.producer()
    snapshots: dict[str, dict[str, int]] = {}
    started = time.monotonic()
    try:
        worker.wait_ready()
        done = 0
        for target in (first, total):
            while done < target:
                n = min(CHUNK, target - done)
                run_tasks(producer, queue, range(done, done + n), 0.0)
                done += n
            time.sleep(1.5)  # let the batch processor and shipper settle before reading
            snapshots[str(target)] = worker.rss_kib()
        worker.stop()
    finally:
        worker.kill()
        producer.close()
        harness.receiver.clear()  # free the receiver's memory of many observations
    at_first, at_total = snapshots[str(first)], snapshots[str(total)]
    growth = {k: round((at_total.get(k, 0) - v) / 1024, 2) for k, v in at_first.items()}
    return {
        "impl": impl, "first_tasks": first, "total_tasks": total,
        "rss_kib_at_first": at_first, "rss_kib_at_total": at_total,
        "growth_mib": growth, "growth_total_mib": round(sum(growth.values()), 2),
        "seconds": round(time.monotonic() - started, 1),
    }

"""Throughput of the five implementations through a real prefork worker on real Redis.

One run = one implementation: a fresh worker (``-c 2``) on a private queue, a warm-up, then
N tasks enqueued with ``send_task`` and all their results fetched with ``.get()``; tasks/s
is N over the time from the first enqueue to the last result. Then a warm shutdown
(SIGTERM), and we count what reached the receiver: nothing can arrive once every worker
process has exited and the receiver has answered the requests in flight, so we wait for
exactly that (bounded), not a fixed time. For this project, spans still in the spool after
the worker exited are shipped by a separate drain (what the next worker start would do) and
counted apart.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from bench._procs import RedisServer, Worker
from bench.apps._common import GENERATION_NAME, TASK_NAME
from tracing.testing import LangfuseReceiver

IMPLEMENTATIONS: dict[str, str] = {
    "untraced": "bench.apps.untraced",
    "observe": "bench.apps.observe_only",
    "observe+shutdown_flush": "bench.apps.observe_shutdown_flush",
    "observe+flush_per_task": "bench.apps.observe_flush_each",
    "celery-langfuse": "bench.apps.instrumented",
}
TRACED = "celery-langfuse"
WARMUP_TASKS = 20
SETTLE_SECONDS = 1.0  # receiver quiet this long after every worker process exited


@dataclass
class RunSettings:
    tasks: int
    work_ms: float
    latency_s: float
    delivery_timeout_s: float = 30.0
    spool_root: Path = field(default_factory=lambda: Path("/tmp"))


@dataclass
class Harness:
    """What every worker run shares: Redis, the in-process receiver, a scratch directory."""

    redis: RedisServer
    receiver: LangfuseReceiver
    scratch: Path

    def worker_env(self, queue: str, spool_dir: Path, **extra: str) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": f"{self.redis.url}/0",
            "CELERY_RESULT_BACKEND": f"{self.redis.url}/1",
            "BENCH_QUEUE": queue,
            "LANGFUSE_PUBLIC_KEY": self.receiver.public_key,
            "LANGFUSE_SECRET_KEY": self.receiver.secret_key,
            "LANGFUSE_BASE_URL": self.receiver.base_url,
            "CELERY_LANGFUSE_SPOOL_DIR": str(spool_dir),
            **extra,
        }

    def producer(self) -> Celery:
        return Celery("bench_producer", broker=f"{self.redis.url}/0",
                      backend=f"{self.redis.url}/1")


def run_tasks(producer: Celery, queue: str, ids: range, work_ms: float,
              timeout: float = 600.0) -> float:
    """Enqueue every task, then fetch every result; seconds from first send to last result."""
    started = time.perf_counter()
    results = [producer.send_task(TASK_NAME, args=[i, work_ms], queue=queue) for i in ids]
    for result in results:
        result.get(timeout=timeout)
        result.forget()
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (clock ticks from /proc/<pid>/stat), in seconds."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_cpu(worker: Worker) -> dict[str, float]:
    children = worker.child_pids()
    return {"main": cpu_seconds(worker.proc.pid),
            "children": sum(cpu_seconds(pid) for pid in children)}


def wait_delivered(receiver: LangfuseReceiver, expected: int, timeout: float) -> float:
    """After the workers exited: wait until ``expected`` generations or a quiet receiver."""
    started = time.monotonic()
    last_count, quiet_since = -1, time.monotonic()
    while time.monotonic() - started < timeout:
        count = generations(receiver)
        if count >= expected:
            break
        if count != last_count or receiver.in_flight:
            last_count, quiet_since = count, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_SECONDS:
            break
        time.sleep(0.05)
    return time.monotonic() - started


def generations(receiver: LangfuseReceiver) -> int:
    return len({o.id for o in receiver.observations if o.name == GENERATION_NAME})


def task_observations(receiver: LangfuseReceiver) -> int:
    return len({o.id for o in receiver.observations if o.name == TASK_NAME})


def run_once(harness: Harness, impl: str, settings: RunSettings, round_no: int) -> dict[str, Any]:
    """One implementation, one round: a fresh worker, N tasks, shutdown, delivery count."""
    receiver = harness.receiver
    receiver.reset_faults()
    receiver.clear()
    receiver.set_latency(settings.latency_s)
    queue = f"bench-{impl}-{uuid.uuid4().hex[:6]}"
    spool_dir = harness.scratch / f"spool-{queue}"
    worker = Worker(IMPLEMENTATIONS[impl], harness.worker_env(queue, spool_dir))
    producer = harness.producer()
    try:
        worker.wait_ready()
        run_tasks(producer, queue, range(-WARMUP_TASKS, 0), settings.work_ms)
        cpu_before = worker_cpu(worker)
        seconds = run_tasks(producer, queue, range(settings.tasks), settings.work_ms)
        cpu_after = worker_cpu(worker)
        stop_started = time.monotonic()
        exit_code = worker.stop()
        shutdown_s = time.monotonic() - stop_started
    finally:
        worker.kill()
        producer.close()
    expected = settings.tasks + WARMUP_TASKS
    traced = impl != "untraced"
    waited = wait_delivered(receiver, expected, settings.delivery_timeout_s) if traced else 0.0
    row: dict[str, Any] = {
        "impl": impl, "round": round_no, "tasks": settings.tasks, "seconds": round(seconds, 4),
        "tasks_per_s": round(settings.tasks / seconds, 2), "shutdown_s": round(shutdown_s, 3),
        "exit_code": exit_code, "expected_generations": expected if traced else 0,
        "delivered_generations": generations(receiver),
        "delivered_task_observations": task_observations(receiver),
        "delivery_wait_s": round(waited, 2), "duplicates": len(receiver.duplicates()),
        "cpu_ms_per_task_main": _per_task_ms(cpu_before["main"], cpu_after["main"], settings),
        "cpu_ms_per_task_children": _per_task_ms(cpu_before["children"],
                                                 cpu_after["children"], settings),
    }
    if impl == TRACED:
        row.update(_drain_leftover(harness, spool_dir))
        row["delivered_generations_after_drain"] = generations(receiver)
    return row


def _per_task_ms(before: float, after: float, settings: RunSettings) -> float:
    return round((after - before) * 1000.0 / settings.tasks, 3)


def _drain_leftover(harness: Harness, spool_dir: Path) -> dict[str, Any]:
    """Ship what the worker left in its spool (as the next start would), and say how much."""
    from tracing import load_config
    from tracing.shipping._shipper import Shipper
    from tracing.spool import SegmentWriter
    from tracing.spool._exporter import SpoolExporter

    config = load_config(public_key=harness.receiver.public_key,
                         secret_key=harness.receiver.secret_key,
                         base_url=harness.receiver.base_url, spool_dir=str(spool_dir))
    shipper = Shipper(config, SpoolExporter(SegmentWriter(spool_dir)))
    left = shipper.pending_bytes()
    stats = shipper.drain(60.0) if left else None
    shipper.transport.close()
    return {"spool_bytes_left_at_exit": left,
            "drained_spans": stats.shipped_spans if stats else 0}

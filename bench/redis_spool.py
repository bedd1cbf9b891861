"""What Redis costs as a spool: memory per span, time per task, hand-off and drain rates.

``python -m bench.redis_spool`` starts a private redis-server, makes real spans with the
Langfuse SDK (a task observation with input/output and a generation, as ``t.generate`` in the
test app makes them), and measures:

* Redis memory per span: ``INFO memory`` ``used_memory`` before and after ``XADD``-ing N span
  records in the hand-off entry format (``tracing.shipping._handoff``), divided by N;
* the task path if Redis were the primary spool: one ``MULTI`` of 2 ``XADD`` + ``INCRBY`` per
  task (loopback), against the local spool's one ``os.write`` of the same 2 frames;
* hand-off (``handoff_remaining``-style batches of 1000) and drain (take + commit, no HTTP)
  rates in spans/s.

Prints one JSON object; the README quotes it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness import RedisServer
from tracing.shipping._handoff import HandoffStore
from tracing.spool import KIND_SPAN, SegmentWriter, encode_frame, list_segments, scan_file


def real_span_payloads(spool: Path, tasks: int) -> list[bytes]:
    """``2 * tasks`` KIND_SPAN payloads made by the real SDK: a task span and a generation."""
    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider

    from tracing.spool._exporter import SpoolExporter

    exporter = SpoolExporter(SegmentWriter(spool))
    client = Langfuse(public_key=f"pk-lf-{uuid.uuid4().hex[:8]}", secret_key="sk",
                      base_url="http://127.0.0.1:9", span_exporter=exporter,
                      tracer_provider=TracerProvider(), flush_at=512)
    for i in range(tasks):
        with client.start_as_current_observation(
            name="t.generate", input={"args": [i], "kwargs": {}},
            metadata={"task_id": str(uuid.uuid4()), "queue": "celery", "retries": 0},
        ) as task:
            with client.start_as_current_observation(
                as_type="generation", name="llm", model="test-model", input=f"prompt {i}",
            ) as generation:
                generation.update(output=f"PROMPT {i}", usage_details={"input": 8, "output": 3})
            task.update(output={"i": i, "text": f"PROMPT {i}"})
        if i % 200 == 199:
            client.flush()  # never let the SDK's queue (2048 spans) overflow
    client.flush()
    client.shutdown()
    return [r.payload for path, _ in list_segments(spool) for r in scan_file(path).records
            if r.kind == KIND_SPAN]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(n_tasks: int = 10_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        payloads = real_span_payloads(root / "made", n_tasks)
        server = RedisServer(root / "redis")
        try:
            return measure(server, root, payloads)
        finally:
            server.stop()


def measure(server: RedisServer, root: Path, payloads: list[bytes]) -> dict[str, Any]:
    client = server.client
    key = "celery-langfuse:handoff:bench"
    store = HandoffStore(server.url, key, consumer="bench")
    client.execute_command("MEMORY", "PURGE")
    before = int(client.info("memory")["used_memory"])
    for start in range(0, len(payloads), 1000):
        store.hand_off([(KIND_SPAN, p) for p in payloads[start:start + 1000]])
    after = int(client.info("memory")["used_memory"])
    per_span = (after - before) / len(payloads)
    payload_avg = statistics.mean(len(p) for p in payloads)

    # Hand-off and drain rates (no HTTP): what a stopping worker and a drainer add.
    client.delete(key, key + ":bytes")
    t0 = time.perf_counter()
    for start in range(0, len(payloads), 1000):
        store.hand_off([(KIND_SPAN, p) for p in payloads[start:start + 1000]])
    handoff_rate = len(payloads) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    drained = 0
    while True:
        items = store.take(1000)
        if not items:
            break
        store.commit(items)
        drained += len(items)
    drain_rate = drained / (time.perf_counter() - t0)

    # The task path: 2 spans per task into Redis (one MULTI) vs into the local spool.
    pairs = [(payloads[i], payloads[i + 1]) for i in range(0, len(payloads) - 1, 2)][:5000]
    redis_us = []
    for a, b in pairs:
        t = time.perf_counter()
        store.hand_off([(KIND_SPAN, a), (KIND_SPAN, b)])
        redis_us.append((time.perf_counter() - t) * 1e6)
    writer = SegmentWriter(root / "local")
    disk_us = []
    for a, b in pairs:
        frames = encode_frame(KIND_SPAN, a) + encode_frame(KIND_SPAN, b)
        t = time.perf_counter()
        writer.append(frames)
        disk_us.append((time.perf_counter() - t) * 1e6)
    store.close()
    return {
        "spans": len(payloads),
        "payload_bytes_avg": round(payload_avg),
        "redis_bytes_per_span": round(per_span),
        "redis_overhead_per_span": round(per_span - payload_avg),
        "redis_used_memory_delta": after - before,
        "task_path_redis_us_p50": round(statistics.median(redis_us)),
        "task_path_redis_us_p99": round(percentile(redis_us, 0.99)),
        "task_path_disk_us_p50": round(statistics.median(disk_us)),
        "task_path_disk_us_p99": round(percentile(disk_us, 0.99)),
        "handoff_spans_per_s": round(handoff_rate),
        "drain_spans_per_s_no_http": round(drain_rate),
        "redis_version": client.info("server")["redis_version"],
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)))

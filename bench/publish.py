"""The producer's cost per send: the publish handler alone, and with the optional
``enqueue <task>`` observation (``CELERY_LANGFUSE_PUBLISH_OBSERVATION``).

``python -m bench.publish [--out bench/results.jsonl]`` calls Celery's ``before_task_publish``
handler the way a publish does, inside a producer's Langfuse observation, alternating blocks
of the two settings so drift hits both alike. Nothing is sent anywhere (no broker; the
client's exporter drops its spans).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langfuse import Langfuse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from bench._stats import summary_us


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def measure(iterations: int = 5000, block: int = 250) -> dict[str, Any]:
    from tracing import _sdk
    from tracing.instrumentation import _propagation

    key = f"pk-lf-bench-publish-{uuid.uuid4().hex[:6]}"
    client = Langfuse(public_key=key, secret_key="sk", base_url="http://127.0.0.1:9",
                      tracer_provider=TracerProvider(), span_exporter=_Drop())
    samples: dict[bool, list[int]] = {False: [], True: []}
    try:
        with client.start_as_current_observation(name="web-request"):
            for n in range(2 * iterations // block):
                enabled = bool(n % 2)
                _propagation.record_publishes(enabled, key)
                for _ in range(block):
                    headers: dict[str, Any] = {"id": "t", "task": "tasks.summarize"}
                    started = time.perf_counter_ns()
                    _propagation._on_before_publish(sender="tasks.summarize", headers=headers,
                                                    routing_key="celery", exchange="")
                    samples[enabled].append(time.perf_counter_ns() - started)
    finally:
        _propagation.record_publishes(False)
        client.flush()
        _sdk.forget_client(key)
    plain, recorded = summary_us(samples[False]), summary_us(samples[True])
    return {"bench": "publish", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "handler": plain, "handler_with_enqueue_observation": recorded,
            "enqueue_observation_cost_median_us": round(
                recorded["median_us"] - plain["median_us"], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args(argv)
    record = measure(args.iterations)
    record["command"] = "python -m bench.publish" + (f" --out {args.out}" if args.out else "")
    print(json.dumps(record, indent=2))
    if args.out:
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

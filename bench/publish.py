"""The producer's cost per send: the publish handler alone, and with the optional
``enqueue <task>`` observation (``CELERY_LANGFUSE_PUBLISH_OBSERVATION``); and per canvas:
what sending a chord from outside any trace costs for its root observation.

``python -m bench.publish [--out bench/results.jsonl]`` calls Celery's ``before_task_publish``
handler the way a publish does, inside a producer's Langfuse observation, alternating blocks
of the two settings so drift hits both alike. Nothing is sent anywhere (no broker; the
client's exporter drops its spans).

``python -m bench.publish --before COMMIT --rounds 5 [--out ...]`` measures the canvas only,
for ``tracing/`` as of COMMIT and as in this tree side by side (``bench.taskpath.snapshot``:
the same bench code, only ``tracing/`` differs), a fresh interpreter per side and round,
sides alternated; ``publish_canvas_compare`` rows give min / median / max over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langfuse import Langfuse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from bench._rows import emit_row
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


def measure_canvas(iterations: int = 2000, block: int = 100, members: int = 4) -> dict[str, Any]:
    """Per canvas: ``chord(4 members).apply_async()`` on Celery's in-process memory broker,
    the publish handler connected (as ``instrument`` connects it), alternating blocks with
    the canvas wrappers installed and not (the difference is what the canvas costs: placing
    it, the callback's pin, naming, input, the span record, one spool write), the queue
    emptied between blocks (untimed: a queue that grows slows every later send); the root
    alone
    (``_canvas.publish`` around a send that does nothing; wall and CPU time). Per plain
    send: the one header
    lookup the pinned callback parent adds to the publish handler."""
    import tempfile

    from celery import Celery, chord, signals

    from tracing import load_config
    from tracing.instrumentation import _canvas, _instrument, _producer, _propagation

    spool = tempfile.mkdtemp(prefix="bench-canvas-")
    _instrument._config = load_config(environ={
        "LANGFUSE_PUBLIC_KEY": "pk-lf-bench", "LANGFUSE_SECRET_KEY": "sk",
        "LANGFUSE_BASE_URL": "http://127.0.0.1:9", "CELERY_LANGFUSE_SPOOL_DIR": spool})
    _producer._shipper = False  # nothing ships: the records stay in the temporary spool
    _producer._pid = os.getpid()
    app = Celery("bench-canvas", broker="memory://", backend="cache+memory://")
    header = [app.signature("tasks.summarize", kwargs={"text": f"text {i}"})
              for i in range(members)]
    body = app.signature("tasks.combine_summaries")
    samples: dict[bool, list[int]] = {False: [], True: []}
    cpu_sends: dict[bool, list[int]] = {False: [], True: []}  # CPU time of this thread
    alone: list[int] = []
    cpu_time: list[int] = []  # the same, CPU time of this thread: less hurt by a busy machine
    signals.before_task_publish.connect(_propagation._on_before_publish, weak=False,
                                        dispatch_uid="bench.publish.handler")
    try:
        chord(header, body).apply_async()  # Celery's own first-send costs, untraced
        _canvas.install()
        cpu, started = time.thread_time_ns(), time.perf_counter_ns()
        chord(header, body).apply_async()  # the first canvas root: spool segment opened
        first = {"wall_us": (time.perf_counter_ns() - started) / 1000,
                 "cpu_us": (time.thread_time_ns() - cpu) / 1000}
        for n in range(2 * iterations // block):
            installed = bool(n % 2)
            (_canvas.install if installed else _canvas.uninstall)()
            for _ in range(block):
                cpu, started = time.thread_time_ns(), time.perf_counter_ns()
                chord(header, body).apply_async()
                samples[installed].append(time.perf_counter_ns() - started)
                cpu_sends[installed].append(time.thread_time_ns() - cpu)
            with app.connection_for_write() as connection:
                connection.default_channel.queue_purge("celery")
        for _ in range(iterations):
            group_id, callback = str(uuid.uuid4()), body.clone()
            started, cpu = time.perf_counter_ns(), time.thread_time_ns()
            _canvas.publish("chord", group_id, header, callback, lambda: None)
            cpu_time.append(time.thread_time_ns() - cpu)
            alone.append(time.perf_counter_ns() - started)
        headers = {f"h{i}": i for i in range(20)}
        lookup: list[int] = []
        for _ in range(iterations):
            started = time.perf_counter_ns()
            headers.pop("celery_langfuse_parent", None)
            lookup.append(time.perf_counter_ns() - started)
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="bench.publish.handler")
        _canvas.uninstall()
        _instrument._config = None
        app.close()
    plain, rooted = summary_us(samples[False]), summary_us(samples[True])
    plain_cpu, rooted_cpu = summary_us(cpu_sends[False]), summary_us(cpu_sends[True])
    return {"bench": "publish_canvas", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "members": members, "chord_send_untraced": plain, "chord_send_traced": rooted,
            "canvas_root_cost_median_us": round(rooted["median_us"] - plain["median_us"], 2),
            "chord_send_untraced_cpu": plain_cpu, "chord_send_traced_cpu": rooted_cpu,
            "canvas_root_cost_cpu_median_us": round(
                rooted_cpu["median_us"] - plain_cpu["median_us"], 2),
            "first_traced_chord_send": first,
            "canvas_root_alone": summary_us(alone),
            "canvas_root_alone_cpu": summary_us(cpu_time),
            "plain_send_added_lookup": summary_us(lookup)}


_CANVAS = """
import json, sys, tracing
from bench.publish import measure_canvas
print(json.dumps({"tracing": tracing.__file__, **measure_canvas(int(sys.argv[1]))}))
"""
_COMPARED = {  # row key -> path into a publish_canvas row
    "canvas_root_alone_cpu_median_us": ("canvas_root_alone_cpu", "median_us"),
    "canvas_root_alone_median_us": ("canvas_root_alone", "median_us"),
    "chord_send_cost_cpu_median_us": ("canvas_root_cost_cpu_median_us",),
    "chord_send_cost_median_us": ("canvas_root_cost_median_us",),
    "chord_send_untraced_cpu_median_us": ("chord_send_untraced_cpu", "median_us"),
    "first_traced_chord_send_cpu_us": ("first_traced_chord_send", "cpu_us"),
}


def compare_canvas(before: str, rounds: int, iterations: int) -> list[dict[str, Any]]:
    """``measure_canvas`` for ``tracing/`` of ``before`` and of this tree (HEAD), a fresh
    interpreter per side and round, sides alternated; one summary row per side."""
    import subprocess
    import tempfile

    from bench._stats import median
    from bench.taskpath import rev, snapshot

    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        roots = snapshot(before, Path(tmp))
        for round_no in range(rounds):
            for side in (["before", "after"] if round_no % 2 == 0 else ["after", "before"]):
                done = subprocess.run(
                    [sys.executable, "-c", _CANVAS, str(iterations)], cwd=roots[side],
                    capture_output=True, text=True, timeout=900, check=True,
                    env={**os.environ, "PYTHONPATH": str(roots[side])})
                row = json.loads(done.stdout.strip().splitlines()[-1])
                if not row.pop("tracing").startswith(str(roots[side])):
                    raise RuntimeError(f"{side}: imported another tree's tracing")
                runs[side].append(row)
    out = []
    for side, rows in runs.items():
        spread = {}
        for key, path in _COMPARED.items():
            values = []
            for row in rows:
                value: Any = row
                for part in path:
                    value = value[part]
                values.append(float(value))
            spread[key] = {"min": round(min(values), 2), "median": round(median(values), 2),
                           "max": round(max(values), 2)}
        out.append({"bench": "publish_canvas_compare", "side": side, "rounds": rounds,
                    "iterations": iterations, "members": rows[0]["members"], **spread,
                    "commits": {"before": rev(before), "after": rev("HEAD")},
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--before", help="compare the canvas cost with tracing/ of this commit")
    parser.add_argument("--rounds", type=int, default=5, help="with --before: rounds per side")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench.publish", *given])
    if args.before:
        for record in compare_canvas(args.before, args.rounds, max(200, args.iterations // 2)):
            record["command"] = command
            emit_row(record, args.out)
        return
    for record in (measure(args.iterations), measure_canvas(max(200, args.iterations // 2))):
        record["command"] = command
        print(json.dumps(record, indent=2))
        if args.out:
            with args.out.open("a") as out:
                out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

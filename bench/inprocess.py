"""Costs measured inside one process, with the real runtime on a temporary spool.

* **Overhead per task** of ``instrument()``: a trivial task run with ``Task.apply()`` (Celery's
  real tracer, which sends ``task_prerun`` / ``task_postrun``) with the handlers connected
  as in a worker's pool child (the eager handlers off, as ``worker_init`` leaves them) and
  the runtime started, against the same task with the handlers disconnected. Blocks of
  the two alternate, so drift (CPU frequency, other processes) hits both alike. Nothing is
  shipped (``ship=False``): the shipper's cost is the worker main process's, measured by the
  throughput runs.
* **Spool append per span**: ``SpoolExporter.export([span])`` for a real task span (compact
  record, framing with crc, one ``os.write``), alternating block by block with the previous
  version's record (OpenTelemetry's OTLP encoder) through the same writer; and the bare
  ``SegmentWriter.append``.
* **Task-end force-flush**: ``runtime.flush()`` (the SDK batch processor's
  ``force_flush`` into the spool) with one task's two spans queued, as at task end.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery

from bench._stats import summary_us

KEYS = {"public_key": "pk-lf-bench-inproc", "secret_key": "sk-lf-bench-inproc",
        "base_url": "http://127.0.0.1:9"}  # never contacted: ship=False


@contextmanager
def traced_runtime(spool_dir: Path) -> Iterator[tuple[Celery, Any]]:
    """An in-process app with a trivial task, instrumented, and the runtime started."""
    import tracing
    from tracing.instrumentation import _runtime

    app = Celery("bench_inprocess", set_as_current=False)
    app.conf.update(task_always_eager=False, task_store_eager_result=False)

    @app.task(name="bench.trivial", shared=False)  # not added to every later app
    def trivial(i: int) -> int:
        return i

    config = tracing.instrument(app, spool_dir=str(spool_dir), **KEYS)
    runtime = _runtime.start(config, ship=False)
    try:
        yield app, runtime
    finally:
        runtime.flush()
        tracing.uninstrument(app)
        _runtime.stop()
        _runtime._runtime = None  # later in-process users (tests) must not see this runtime


def _as_in_a_worker() -> None:
    """Disconnect the eager handlers, as ``worker_init`` does in a worker (so its pool
    children never run them): ``Task.apply()`` then costs what a pool child's task pays. By
    dispatch uid, not through ``tracing``: the before side of ``bench.taskpath`` runs this
    code against an older ``tracing/``."""
    from celery import signals

    for signal, name in ((signals.task_prerun, "on_eager_prerun"),
                         (signals.task_postrun, "on_eager_postrun"),
                         (signals.task_postrun, "after_eager_postrun")):
        signal.disconnect(dispatch_uid=f"celery_langfuse.{name}")


def _time_block(call: Callable[[], Any], n: int) -> list[int]:
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - started)
    return samples


def _handlers_on_off(task: Any, iterations: int, block: int,
                     between: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """``task.apply()`` timed in alternating blocks with the worker handlers connected and
    disconnected (``between`` runs after each block); their summaries and difference (µs)."""
    from tracing.instrumentation._instrument import (
        _connect_worker_handlers,
        _disconnect_worker_handlers,
    )

    _time_block(lambda: task.apply(args=(0,)), 200)  # warm caches and the SDK
    traced: list[int] = []
    plain: list[int] = []
    gc.collect()
    for _ in range(max(1, iterations // block)):
        _connect_worker_handlers()
        _as_in_a_worker()
        traced += _time_block(lambda: task.apply(args=(1,)), block)
        between()
        _disconnect_worker_handlers()
        plain += _time_block(lambda: task.apply(args=(1,)), block)
        between()
    _connect_worker_handlers()
    with_tracing, without = summary_us(traced), summary_us(plain)
    return {
        "traced": with_tracing, "untraced": without,
        "overhead_median_us": round(with_tracing["median_us"] - without["median_us"], 2),
        "overhead_p99_us": round(with_tracing["p99_us"] - without["p99_us"], 2),
    }


def task_overhead(spool_dir: Path, iterations: int, block: int = 200) -> dict[str, Any]:
    """Per-task time with and without the handlers, and their difference (µs)."""
    import tracing

    with traced_runtime(spool_dir) as (app, runtime):
        result = _handlers_on_off(app.tasks["bench.trivial"], iterations, block)
        assert tracing.is_instrumented(app)
        runtime.flush()
    return result


def generation_overhead(spool_dir: Path, iterations: int, block: int = 200) -> dict[str, Any]:
    """As :func:`task_overhead`, for a task whose body makes one SDK generation (so the
    difference also holds what the task's tracing adds to exporting the generation)."""
    with traced_runtime(spool_dir) as (app, runtime):
        client = runtime.client

        @app.task(name="bench.generation", shared=False)
        def generation(i: int) -> int:
            with client.start_as_current_observation(
                name="llm", as_type="generation", model="bench-model", input=f"prompt {i}",
            ) as observation:
                observation.update(output=f"PROMPT {i}", usage_details={"input": 2, "output": 2})
            return i

        return _handlers_on_off(app.tasks["bench.generation"], iterations, block,
                                between=runtime.flush)


def otlp_span_frame(span: Any) -> bytes:
    """The previous version's record: a one-span OTLP request (OpenTelemetry's encoder)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from tracing.spool import KIND_SPAN, encode_frame, span_payload

    context = span.get_span_context()
    return encode_frame(KIND_SPAN, span_payload(
        context.span_id.to_bytes(8, "big"), context.trace_id.to_bytes(16, "big"),
        encode_spans([span]).SerializeToString()))


def spool_costs(spool_dir: Path, iterations: int, block: int = 200) -> dict[str, Any]:
    """Spool append per span (compact record, and the previous OTLP record, in alternating
    blocks), bare segment write per frame, and the task-end force-flush."""
    from tracing.spool._exporter import span_frame

    with traced_runtime(spool_dir) as (_app, runtime):
        client = runtime.client
        span = _task_like_span(client)
        frame = span_frame(span)
        exporter, writer = runtime.exporter, runtime.exporter.writer
        export: list[int] = []
        export_otlp: list[int] = []
        for _ in range(max(1, iterations // block)):
            export += _time_block(lambda: exporter.export([span]), block)
            export_otlp += _time_block(
                lambda: exporter.write(otlp_span_frame(span), 1), block)
        write = _time_block(lambda: writer.append(frame), iterations)
        flush: list[int] = []
        for _ in range(iterations):
            _one_task_of_spans(client)
            started = time.perf_counter_ns()
            runtime.flush()
            flush.append(time.perf_counter_ns() - started)
    return {"append_per_span": summary_us(export),
            "append_per_span_previous_otlp_record": summary_us(export_otlp),
            "write_per_frame": summary_us(write), "frame_bytes": len(frame),
            "previous_frame_bytes": len(otlp_span_frame(span)),
            "force_flush_2_spans": summary_us(flush)}


def _one_task_of_spans(client: Any) -> None:
    """A task observation with one generation under it, both ended (2 queued spans)."""
    with client.start_as_current_observation(
        name="bench.trivial", input={"args": [1], "kwargs": {}},
        metadata={"task_id": "x", "queue": "bench"},
    ) as task, client.start_as_current_observation(
        name="llm", as_type="generation", model="bench-model", input="prompt 1",
    ) as generation:
        generation.update(output="PROMPT 1", usage_details={"input": 2, "output": 2})
        task.update(output={"i": 1})


def _task_like_span(client: Any) -> Any:
    """A real SDK ``ReadableSpan`` shaped like a task observation (captured, not exported)."""
    captured: list[Any] = []
    processor = _capture(client, captured)
    try:
        _one_task_of_spans(client)
    finally:
        processor()
    return next(s for s in captured if s.name == "bench.trivial")


def _capture(client: Any, into: list[Any]) -> Callable[[], None]:
    """Record spans ending on ``client``'s tracer provider; returns the undo function."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Recorder(SpanProcessor):
        recording = True

        def on_end(self, span: Any) -> None:
            if self.recording:
                into.append(span)

    from tracing import _sdk

    recorder = Recorder()
    _sdk.tracer_provider_of(KEYS["public_key"]).add_span_processor(recorder)

    def undo() -> None:
        recorder.recording = False

    return undo

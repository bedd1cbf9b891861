"""Task spans that write their own record (``tracing.instrumentation._task_span_tracer``):
the same record, the same limits and the same API rules as an OpenTelemetry SDK span, and
the Langfuse SDK's calls inside a task still reach the task's observation."""

from __future__ import annotations

import marshal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langfuse import get_client
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, Status, StatusCode

from tests.test_task_pipeline import IMAGE, records, spooled, traced_app
from tracing.instrumentation._client import task_tracer
from tracing.instrumentation._otel import PinnedIds
from tracing.instrumentation._task_span_tracer import TaskSpanTracer, scope_for
from tracing.spool import KIND_SPAN, SegmentWriter, list_segments, scan_file
from tracing.spool._exporter import SpoolExporter
from tracing.spool._spanrecord import encode_record

ATTRIBUTES = {"langfuse.observation.type": "span", "a": "x" * 40, "n": 7, "ok": True}


def _both(tmp_path: Path, limits: SpanLimits,
          script: Callable[[Any], None]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``script`` run on an OpenTelemetry SDK span and on a task span with the same limits;
    the compact fields of each one's record."""
    resource = Resource({"service.name": "t"})
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=resource, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(kept))
    sdk_tracer = provider.get_tracer("langfuse-sdk", "5", attributes={"public_key": "pk"})
    sdk_span = sdk_tracer.start_span("task", context=otel_context.Context(),
                                     attributes=ATTRIBUTES)
    script(sdk_span)
    sdk_span.end()

    spool = SpoolExporter(SegmentWriter(tmp_path / "spool"))
    tracer = TaskSpanTracer(provider, None, scope_for("langfuse-sdk", "5", "pk"),
                            PinnedIds(), limits, lambda: (spool, None))
    task_span = tracer.start_span("task", context=otel_context.Context(),
                                  attributes=ATTRIBUTES)
    script(task_span)
    task_span.end()
    spool.writer.close()
    [payload] = records(tmp_path, KIND_SPAN)
    [ended] = kept.get_finished_spans()
    return marshal.loads(encode_record(ended)[25:]), marshal.loads(payload[25:])


def _same_fields(sdk: tuple[Any, ...], ours: tuple[Any, ...]) -> None:
    """Equal but for the times (two spans, two clocks)."""
    for index in range(17):
        if index in (4, 5):
            continue
        if index == 9:  # events: their times differ, stack traces name different lines
            assert [(name, sorted(attrs)) for name, _, attrs, _ in sdk[index]] == [
                (name, sorted(attrs)) for name, _, attrs, _ in ours[index]]
            continue
        assert sdk[index] == ours[index], f"field {index}: {sdk[index]!r} != {ours[index]!r}"


def test_a_task_span_writes_the_record_the_exporter_writes_for_an_sdk_span(tmp_path):
    """Name, parent, flags, status, attributes, links, resource and scope of a task span's
    record are those of an OpenTelemetry SDK span given the same calls."""
    def script(span: Any) -> None:
        span.set_attributes({"langfuse.observation.output": "{}", "f": 1.5, "t": ("a", "b")})
        span.set_attribute("langfuse.observation.level", "ERROR")
        span.add_link(SpanContext(7, 8, True), {"why": "sent by"})
        span.set_status(Status(StatusCode.ERROR, "boom"))

    _same_fields(*_both(tmp_path, SpanLimits(), script))


def test_limits_and_status_rules_are_opentelemetrys(tmp_path):
    """Count and length limits evict and cut as OpenTelemetry does; an OK status is final;
    UNSET replaces nothing; a value OpenTelemetry refuses is dropped; the name can change and
    an exception is an ``exception`` event."""
    def script(span: Any) -> None:
        span.set_attributes({f"k{i}": f"value {i}" for i in range(6)})
        span.set_attribute("bad", {"a": "dict"})
        span.set_status(StatusCode.OK)
        span.set_status(Status(StatusCode.ERROR, "too late"))
        span.set_status(StatusCode.UNSET)
        span.update_name("renamed")
        span.record_exception(ValueError("boom"))

    sdk, ours = _both(tmp_path, SpanLimits(max_span_attributes=5, max_attribute_length=4),
                      script)
    _same_fields(sdk, ours)
    assert ours[0] == "renamed" and ours[6] == StatusCode.OK.value
    assert ours[12] > 0 and all(len(v) <= 4 for v in ours[8].values() if isinstance(v, str))


def test_an_ended_task_span_changes_no_more_and_writes_once(tmp_path):
    """A second ``end`` writes nothing, and calls after the end change nothing."""
    def script(span: Any) -> None:
        span.end()
        span.set_attribute("late", "x")
        span.update_name("late")

    sdk, ours = _both(tmp_path, SpanLimits(), script)  # _both asserts a single record
    assert "late" not in ours[8] and ours[0] == "task"
    _same_fields(sdk, ours)


def test_the_langfuse_sdk_updates_the_task_observation_from_the_task_body(tmp_path):
    """``update_current_span`` in a task body reaches the task's own observation, and the
    task's record is written by the task span itself (the direct road)."""
    with traced_app(tmp_path) as app:
        key = _client_key()
        assert task_tracer(key).route() is not None  # no filter, no mask: the direct road

        @app.task(name="pipe.updates", shared=False)
        def updates() -> int:
            get_client(public_key=key).update_current_span(metadata={"from_body": "yes"},
                                                           version="v9")
            return 1

        updates.apply()
        spans = spooled(tmp_path)
    task = spans["pipe.updates"]
    assert task.metadata.get("from_body") == "yes" and task.version == "v9"


def _client_key() -> str:
    from tracing.instrumentation import _runtime

    runtime = _runtime.current()
    assert runtime is not None
    return runtime.config.public_key or ""


def test_the_default_samplers_rule_is_the_samplers_own_decision(tmp_path):
    """With OpenTelemetry's default sampler, a root is sampled and a child follows its
    parent's flag (local or remote), with its trace state: what the sampler decides."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace.sampling import DEFAULT_ON
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    tracer = TaskSpanTracer(TracerProvider(), None, scope_for("langfuse-sdk", "5", "pk"),
                            PinnedIds(), SpanLimits(), lambda: None)
    assert tracer.sampler is DEFAULT_ON
    state = TraceState([("k", "v")])
    for remote in (False, True):
        for flags in (TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)):
            parent = SpanContext(5, 6, remote, flags, state)
            context = otel_trace.set_span_in_context(NonRecordingSpan(parent))
            expected = DEFAULT_ON.should_sample(context, 5, "t")
            span = tracer.start_span("t", context=context)
            assert span.is_recording() == expected.decision.is_recording()
            assert span.get_span_context().trace_flags.sampled == expected.decision.is_sampled()
            assert span.get_span_context().trace_state == expected.trace_state
    root = tracer.start_span("t", context=otel_context.Context())
    assert root.is_recording() and root.get_span_context().trace_flags.sampled


def test_a_later_runtime_gets_the_task_records_of_the_same_client(tmp_path):
    """When a process starts another runtime for the same key (the SDK's client already
    exists and is redirected), task spans write into the new spool, not the old one, and a
    task input holding media still takes the SDK's media path."""
    from tracing.instrumentation import _runtime

    with traced_app(tmp_path) as app:
        key = _client_key()
        config = _runtime.current().config  # type: ignore[union-attr]
        _runtime.stop()
        _runtime._runtime = None
        moved = tmp_path / "again" / "spool"
        _runtime.start(config.__class__(**{**config.__dict__, "spool_dir": str(moved)}),
                       ship=False)
        assert task_tracer(key).route() is not None
        app.tasks["pipe.plain"].apply()
        later = [r.payload for path, _ in list_segments(moved)
                 for r in scan_file(path).records if r.kind == KIND_SPAN]
        assert len(later) == 2, "the task span and its child went to the new spool"
        app.tasks["pipe.generate"].apply(kwargs={"image": IMAGE})
        text = str(spooled(tmp_path / "again")["pipe.generate"].input)
    assert IMAGE not in text and "@@@langfuseMedia:" in text

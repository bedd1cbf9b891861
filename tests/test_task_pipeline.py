"""The span pipeline of a process that runs tasks (``tracing.instrumentation._pipeline``),
in-process with the real SDK and the real spool: every span is in the spool when it ends, and
every rule of the SDK's span processor still holds for task spans and the user's own spans."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from langfuse import get_client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

import tracing
from tracing import _sdk
from tracing.spool import KIND_OPEN, KIND_SPAN, list_segments, scan_file
from tracing.spool._attempts import OpenAttempt, from_span, open_frame
from tracing.spool._spanrecord import otlp_request
from tracing.testing import Observation
from tracing.testing._decode import decode_observations

IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 8


@contextmanager
def traced_app(tmp_path: Path, **options: Any) -> Iterator[Celery]:
    """An instrumented in-process app (unique keys) with the runtime started, no shipper."""
    from tracing.instrumentation import _runtime

    key = f"pk-lf-pipe-{uuid.uuid4().hex[:8]}"
    app = Celery(f"pipe_{key}", set_as_current=False)

    @app.task(name="pipe.generate", shared=False)
    def generate(prompt: str = "hello", image: str | None = None) -> dict[str, str]:
        with get_client(public_key=key).start_as_current_observation(
            name="llm", as_type="generation", model="m", input=prompt,
        ) as generation:
            generation.update(output=prompt.upper())
        return {"text": prompt.upper()}

    @app.task(name="pipe.look", shared=False)
    def look() -> list[str]:
        with get_client(public_key=key).start_as_current_observation(name="ended-first"):
            pass
        return sorted(spooled(tmp_path))  # read from disk while the task still runs

    @app.task(name="pipe.plain", shared=False)
    @tracing.task_options(trace_attributes=lambda kwargs: {"user_id": kwargs.get("user")})
    def plain(user: str = "") -> int:
        with get_client(public_key=key).start_as_current_observation(name="step"):
            pass
        return 1

    config = tracing.instrument(app, spool_dir=str(tmp_path / "spool"), public_key=key,
                                secret_key="sk-lf-pipe", base_url="http://127.0.0.1:9",
                                **options)
    _runtime.start(config, ship=False)
    try:
        yield app
    finally:
        tracing.uninstrument(app)
        _runtime.stop()
        _runtime._runtime = None
        _sdk.forget_client(key)


def records(tmp_path: Path, kind: int) -> list[bytes]:
    """Payloads of every ``kind`` record in the spool, read from disk."""
    return [r.payload for path, _ in list_segments(tmp_path / "spool")
            for r in scan_file(path).records if r.kind == kind]


def spooled(tmp_path: Path) -> dict[str, Observation]:
    """The spans on disk, as Langfuse would store them, by name."""
    found: dict[str, Observation] = {}
    for payload in records(tmp_path, KIND_SPAN):
        request = ExportTraceServiceRequest.FromString(otlp_request(payload))
        for observation in decode_observations(request, time.time()):
            assert observation.name not in found, f"{observation.name} spooled twice"
            found[observation.name] = observation
    return found


def test_every_span_is_in_the_spool_when_it_ends_without_a_flush(tmp_path):
    """A task's generation and its own span are on disk when the task returns: no batch
    thread, no force-flush; the open-attempt record (compact form) came first."""
    with traced_app(tmp_path) as app:
        app.tasks["pipe.generate"].apply(kwargs={"prompt": "hi"})
        spans = spooled(tmp_path)
        assert set(spans) == {"pipe.generate", "llm"}
        [opened] = records(tmp_path, KIND_OPEN)
        assert opened[:1] == b"\x02"
        attempt = OpenAttempt.from_payload(opened)
        assert attempt.span_id == spans["pipe.generate"].id and attempt.name == "pipe.generate"


def test_a_span_is_on_disk_as_soon_as_it_ends_even_with_a_long_flush_interval(tmp_path):
    """A span ended inside a task is in the spool before the task body goes on: no timer,
    no queue (a SIGKILL right after it ends cannot lose it)."""
    with traced_app(tmp_path, flush_interval=60.0) as app:
        assert app.tasks["pipe.look"].apply().get() == ["ended-first"]


def test_the_task_is_the_parentless_app_root_and_its_children_are_not(tmp_path):
    """The root task's span has no parent and is its trace's app root; the generation hangs
    under it and is never marked an app root (the task context claims the root)."""
    with traced_app(tmp_path) as app:
        app.tasks["pipe.generate"].apply()
        spans = spooled(tmp_path)
    task, generation = spans["pipe.generate"], spans["llm"]
    assert task.parent_observation_id is None and task.is_app_root
    assert generation.parent_observation_id == task.id
    assert generation.trace_id == task.trace_id and not generation.is_app_root


def test_should_export_span_applies_to_user_spans_and_task_spans(tmp_path):
    """The user's ``should_export_span`` drops what it refuses, task spans included."""
    keep: Callable[[Any], bool] = lambda span: span.name not in ("llm", "pipe.plain")  # noqa: E731
    with traced_app(tmp_path, should_export_span=keep) as app:
        app.tasks["pipe.generate"].apply()
        app.tasks["pipe.plain"].apply()
        assert set(spooled(tmp_path)) == {"pipe.generate", "step"}


def test_sampling_decides_for_the_task_and_its_children_alike(tmp_path):
    """With a sample rate of 0 neither the task nor its generation is recorded or spooled,
    and no attempt is opened for it."""
    with traced_app(tmp_path, sample_rate=0.0) as app:
        assert app.tasks["pipe.generate"].apply().get() == {"text": "HELLO"}
        assert spooled(tmp_path) == {}
        assert records(tmp_path, KIND_OPEN) == []


def test_trace_attributes_propagate_to_the_task_and_the_users_spans(tmp_path):
    """Trace attributes extracted from the task's kwargs land on the task span and on the
    spans the body makes (the SDK's propagation, applied by its processor)."""
    with traced_app(tmp_path) as app:
        app.tasks["pipe.plain"].apply(kwargs={"user": "u-7"})
        spans = spooled(tmp_path)
    assert spans["pipe.plain"].user_id == "u-7"
    assert spans["step"].user_id == "u-7"


def test_mask_applies_to_task_input_and_to_the_users_generation(tmp_path):
    """The configured mask rewrites the task's input and the generation's input."""
    def mask(data: Any, **_: Any) -> Any:
        return "<masked>" if isinstance(data, str) and "secret" in data else (
            {k: mask(v) for k, v in data.items()} if isinstance(data, dict) else
            [mask(v) for v in data] if isinstance(data, list) else data)

    with traced_app(tmp_path, mask=mask) as app:
        app.tasks["pipe.generate"].apply(kwargs={"prompt": "my secret"})
        spans = spooled(tmp_path)
    assert "secret" not in str(spans["pipe.generate"].input)
    assert spans["llm"].input == "<masked>"


def test_media_in_a_task_input_takes_the_sdks_media_path(tmp_path):
    """A base64 data URI in a task's input is replaced by a Langfuse media reference, as the
    SDK's exporter does for its own spans (the task span skips only its start bookkeeping)."""
    with traced_app(tmp_path) as app:
        app.tasks["pipe.generate"].apply(kwargs={"image": IMAGE})
        spans = spooled(tmp_path)
    text = str(spans["pipe.generate"].input)
    assert IMAGE not in text and "@@@langfuseMedia:" in text


def test_compact_open_record_reads_back_as_the_json_one(tmp_path):
    """The compact open-attempt record of a live span decodes to the same attempt as the
    JSON form (still read for records written by earlier versions)."""
    captured: list[Any] = []
    with traced_app(tmp_path) as app:
        from tracing.instrumentation import _task_tracing

        original = _task_tracing.open_frame

        def keep(task_id: str, span: Any) -> bytes:
            captured.append((task_id, span, from_span(task_id, span)))
            return original(task_id, span)

        _task_tracing.open_frame = keep  # type: ignore[assignment]
        try:
            app.tasks["pipe.generate"].apply(kwargs={"prompt": "x"})
        finally:
            _task_tracing.open_frame = original
    [(task_id, _span, as_json)] = captured
    [payload] = records(tmp_path, KIND_OPEN)
    compact = OpenAttempt.from_payload(payload)
    from_json = OpenAttempt.from_payload(as_json.frame()[11:])
    assert compact == from_json and compact.task_id == task_id


def test_an_undecodable_compact_open_record_is_a_value_error():
    """A compact open record that does not decode raises ValueError (logged and skipped by
    the attempt index), never something else."""
    with pytest.raises(ValueError, match="undecodable open-attempt record"):
        OpenAttempt.from_payload(b"\x02not marshal")


def test_open_frame_falls_back_to_json_for_a_value_marshal_refuses():
    """A span attribute marshal cannot write makes a JSON open record, not an error."""
    class Odd:
        def __str__(self) -> str:
            return "odd"

    class Span:
        name = "t"
        parent = None
        start_time = 1
        attributes = {"x": Odd()}
        resource = Resource({"service.name": "s"})
        instrumentation_scope = None

        def get_span_context(self) -> Any:
            from opentelemetry.trace import SpanContext

            return SpanContext(1, 2, False)

    payload = open_frame("t-1", Span())[11:]
    assert payload[:1] == b"{" and OpenAttempt.from_payload(payload).attributes == {"x": "odd"}


def test_an_applications_provider_still_sees_task_spans(tmp_path):
    """With ``instrument(tracer_provider=...)`` task spans stay on the application's provider
    (its own processors see them) and still reach the spool when they end."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    theirs = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(theirs))
    with traced_app(tmp_path, tracer_provider=provider) as app:
        app.tasks["pipe.generate"].apply()
        spans = spooled(tmp_path)
    assert set(spans) == {"pipe.generate", "llm"}
    assert {s.name for s in theirs.get_finished_spans()} == {"pipe.generate", "llm"}
    assert spans["pipe.generate"].is_app_root and not spans["llm"].is_app_root


def test_an_excluded_chord_member_still_sends_its_callback_under_the_pin(tmp_path):
    """A chord member excluded from tracing has no observation, yet the callback it sends
    hangs under the parent pinned on its message, and nothing of it stays attached."""
    from celery import signals
    from opentelemetry import trace as otel_trace

    from tracing.instrumentation._propagation import CALLBACK_HEADER

    pinned = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    sent: list[dict[str, Any]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        sent.append(dict(headers or {}))

    with traced_app(tmp_path, exclude_tasks="pipe.member") as app:
        app.conf.broker_url = "memory://"

        @app.task(name="pipe.member", shared=False)
        def member() -> None:
            app.send_task("pipe.total", task_id="cb-1")  # what the chord's join sends
            app.send_task("pipe.other", task_id="t-2")

        signals.before_task_publish.connect(record, weak=False)
        try:
            member.apply(headers={CALLBACK_HEADER: f"cb-1 {pinned}"})
        finally:
            signals.before_task_publish.disconnect(record)
        assert not otel_trace.get_current_span().get_span_context().is_valid
        assert records(tmp_path, KIND_OPEN) == []
    callback, other = sent
    assert callback["traceparent"] == pinned and "traceparent" not in other

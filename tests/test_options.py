"""Per-task options and producer-side propagation, in-process."""

from __future__ import annotations

import json
from datetime import UTC

import pytest
from celery import Celery, shared_task
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tracing
from tracing.instrumentation._options import DEFAULT_OPTIONS, options_for
from tracing.instrumentation._propagation import inject, read_headers


def test_options_are_read_from_the_task_function():
    """@task_options under @app.task sets the observation type and capture flags."""
    app = Celery("opts")

    @app.task(name="o.agent")
    @tracing.task_options(as_type="agent", capture_output=False)
    def agent() -> None: ...

    options = options_for(app.tasks["o.agent"])
    assert options.as_type == "agent" and options.capture_output is False
    assert options_for(app.tasks["celery.chord_unlock"]) == DEFAULT_OPTIONS


def test_options_on_shared_task():
    """@task_options works under @shared_task too."""
    @shared_task(name="o.shared")
    @tracing.task_options(as_type="tool")
    def shared() -> None: ...

    app = Celery("shared")
    assert options_for(app.tasks["o.shared"]).as_type == "tool"


def test_decorator_order_mistake_is_an_error():
    """@task_options above @app.task raises a clear TypeError instead of doing nothing."""
    app = Celery("order")
    with pytest.raises(TypeError, match=r"directly under @app\.task"):
        @tracing.task_options(as_type="agent")
        @app.task(name="o.wrong")
        def wrong() -> None: ...


def test_unknown_observation_type():
    """An unknown observation type is refused, listing the known ones."""
    with pytest.raises(ValueError, match=r"as_type='robot'.*agent"):
        tracing.task_options(as_type="robot")


def test_headers_carry_attributes_and_traceparent_at_the_top_level_only():
    """The producer writes trace attributes and traceparent as top-level headers and never a
    nested "headers" dict (which would become the task's whole request.headers)."""
    client = Langfuse(public_key="pk-opts", secret_key="sk", base_url="http://127.0.0.1:9",
                      tracer_provider=TracerProvider(), span_exporter=InMemorySpanExporter())
    headers: dict[str, object] = {}
    with client.start_as_current_observation(name="producer") as span, \
            tracing.trace_attributes(user_id="u", tags=["a"]), \
            tracing.trace_attributes(session_id="s", tags=["b"]):
        inject(headers)
    assert "headers" not in headers
    assert span.trace_id in str(headers["traceparent"]) and span.id in str(headers["traceparent"])
    assert json.loads(str(headers["celery_langfuse"])) == {
        "user_id": "u", "session_id": "s", "tags": ["a", "b"]}


def test_headers_are_read_from_either_level():
    """A task request's headers are found at the top level or nested under "headers"."""
    class Request:
        def __init__(self, headers: dict[str, object]) -> None:
            self.headers = headers

    top = read_headers(Request({"celery_langfuse": '{"user_id": "x"}'}))
    nested = read_headers(Request({"headers": {"celery_langfuse": '{"user_id": "y"}'}}))
    assert top.attributes.user_id == "x" and nested.attributes.user_id == "y"
    assert read_headers(Request({"celery_langfuse": "{broken"})).attributes.user_id is None


def test_trace_id_is_derived_from_the_root_id():
    """Any process can compute a task tree's trace id from its root task id."""
    assert tracing.trace_id_for("abc") == Langfuse.create_trace_id(seed="abc")
    assert len(tracing.trace_id_for("abc")) == 32


def test_only_spans_that_may_hold_media_go_through_the_sdk_transformer(captured):
    """Spans with base64 data URIs take the SDK's media path; plain spans skip its cloning."""
    from tracing.instrumentation._client import may_hold_media

    plain = captured.langfuse.start_observation(name="plain", input={"text": "hello"})
    plain.end()
    image = "data:image/png;base64," + "A" * 64
    media = captured.langfuse.start_observation(name="media", input={"image": image})
    media.end()
    spans = {span.name: span for span in captured.spans()}
    assert not may_hold_media(spans["plain"].attributes)
    assert may_hold_media(spans["media"].attributes)
    assert may_hold_media({"a": "x", "tags": ("y", image)}) and not may_hold_media({"a": "d\0ata"})


def test_join_modes_are_validated_where_they_are_set():
    """A join mode other than parent/link/off is refused by task_options, trace_attributes
    and the configuration, each naming the value."""
    with pytest.raises(ValueError, match="join='sideways'"):
        tracing.task_options(join="sideways")
    with pytest.raises(ValueError, match="join='sideways'"), tracing.trace_attributes(
            join="sideways"):
        pass
    with pytest.raises(tracing.ConfigError, match="CELERY_LANGFUSE_JOIN='sideways'"):
        tracing.load_config({"CELERY_LANGFUSE_JOIN": "sideways"})
    assert tracing.load_config({"CELERY_LANGFUSE_JOIN": "LINK"}).join == "link"


def test_queue_wait_is_never_negative_and_counts_from_the_eta():
    """A producer clock ahead of ours gives 0, not a negative wait; an ETA in the past is
    where the wait starts."""
    import time
    from datetime import datetime

    from tracing.instrumentation._task_tracing import queue_wait_ms

    assert queue_wait_ms(time.time() + 60, None) == 0.0
    assert queue_wait_ms(None, None) is None
    eta = datetime.fromtimestamp(time.time() - 1, UTC).isoformat()
    assert 900 <= (queue_wait_ms(time.time() - 10, eta) or 0) < 5000


def test_link_join_moves_the_sender_into_metadata():
    """join="link" drops the carrier, roots the task in its own trace, and records the
    sender's trace and observation ids; "off" drops the carrier only."""
    from tracing.instrumentation._task_tracing import joined

    carrier = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    metadata: dict[str, object] = {}
    assert joined("link", carrier, "t1", "r1", metadata) == ({}, "t1")
    assert metadata == {"linked_trace_id": "a" * 32, "linked_observation_id": "b" * 16}
    assert joined("off", carrier, "t1", "r1", {}) == ({}, "r1")
    assert joined("parent", carrier, "t1", "r1", {}) == (carrier, "r1")

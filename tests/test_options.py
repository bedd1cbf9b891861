"""Per-task options and producer-side propagation, in-process."""

from __future__ import annotations

import json

import pytest
from celery import Celery, shared_task
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tracing
from tracing._options import DEFAULT_OPTIONS, options_for
from tracing._propagation import inject, read_headers


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


def test_headers_carry_attributes_and_traceparent_at_both_levels():
    """The producer writes trace attributes and traceparent at both header levels."""
    client = Langfuse(public_key="pk-opts", secret_key="sk", base_url="http://127.0.0.1:9",
                      tracer_provider=TracerProvider(), span_exporter=InMemorySpanExporter())
    headers: dict[str, object] = {}
    with client.start_as_current_observation(name="producer") as span, \
            tracing.trace_attributes(user_id="u", tags=["a"]), \
            tracing.trace_attributes(session_id="s", tags=["b"]):
        inject(headers)
    nested = headers["headers"]
    assert isinstance(nested, dict)
    for level in (headers, nested):
        assert span.trace_id in str(level["traceparent"]) and span.id in str(level["traceparent"])
        assert json.loads(str(level["celery_langfuse"])) == {
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
    from tracing._client import _may_hold_media

    plain = captured.langfuse.start_observation(name="plain", input={"text": "hello"})
    plain.end()
    image = "data:image/png;base64," + "A" * 64
    media = captured.langfuse.start_observation(name="media", input={"image": image})
    media.end()
    spans = {span.name: span for span in captured.spans()}
    assert not _may_hold_media(spans["plain"])
    assert _may_hold_media(spans["media"])

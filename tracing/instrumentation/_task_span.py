"""A task attempt's span: where it hangs in its trace, and how it is made.

Where it hangs (the Langfuse v4 server's rules: a trace's name, input, output and metadata
come from the span with an empty parent span id, and every other span must be a real child
that is never an app root):

==================================================  =========================================
the message                                          the attempt's span
==================================================  =========================================
carries W3C ``traceparent`` (the producer, or the    a child of that span, in its trace: chain
task that sent it, was inside an observation)        links, callbacks, retries, sub-tasks
no ``traceparent``, the tree's root task, first      THE trace root: no parent at all, trace
attempt, first execution                             id ``trace_id_for(root_id)``, span id
                                                     ``root_observation_id_for(root_id)``
no ``traceparent``, any other task of the tree: a    a child of the root task's first attempt
later attempt or a later execution of the root       (both ids derived from ``root_id``, so
task, a canvas member whose ``root_id`` names        any process can compute them), with a
another task                                         span id of its own
==================================================  =========================================

Every execution of a message is its own observation (``_redelivery``): a redelivered root
task's message (acks_late after a lost worker, ``Reject(requeue=True)``, a resent task id, an
eager re-apply) must not take the derived root id a second time — Langfuse would keep one of
the two and the killed run would vanish, its generations under the run that replaced it — nor
become a second parentless root. So the first execution keeps the derived root id and stays
the trace's one root (ERROR if it died: the main process or the shipper closes it under that
id), and each later execution hangs under it with an id of its own, its own generations under
it. The trace's name and input come from the first execution either way; its output is the
first execution's (none if it died), the redelivered run's output is on its own observation.

Celery's own root ids always name a task that runs first (a chain's first link). The
members of a group or chord carry ``traceparent``: their sender puts them under its own
observation, or under a canvas root it writes (``_canvas``), so a canvas is one trace.

A retry is published by the attempt that failed, from inside its observation, so attempt
*n+1* hangs under attempt *n*: the trace reads as the sequence that happened.

How it is made: directly on the task tracer (``_task_span_tracer``: a span of the SDK's
instrumentation scope that writes its own record into the spool when it ends, or hands
itself to the SDK processor's export rules when the user's filter, mask or media need them)
with the attribute names the SDK writes, instead of through ``start_observation`` +
``update``. The SDK never sees a task span start, so the
one start-time rule of its processor that applies to a task span is applied here: a
parentless task span (a true root) is marked its trace's app root; a span started under a
remote parent carries the SDK's root-claim baggage and is never one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from langfuse import Langfuse
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tracing import _sdk
from tracing.instrumentation._otel import pinned_ids
from tracing.instrumentation._task_span_tracer import TaskSpanTracer

_propagator = TraceContextTextMapPropagator()
_NAMES = _sdk.attribute_names()


def trace_id_for(root_id: str) -> str:
    """The Langfuse trace id of a task tree: derived from its root task id."""
    return Langfuse.create_trace_id(seed=root_id)


def root_observation_id_for(root_id: str) -> str:
    """The observation id of the first attempt of a tree's root task (16 hex digits)."""
    digest = hashlib.sha256(f"celery-langfuse:root:{root_id}".encode()).digest()
    return (digest[:8] if any(digest[:8]) else b"\x00" * 7 + b"\x01").hex()


def placement(
    carrier: Mapping[str, str], task_id: str, root_id: str | None, retries: int,
    execution: int = 1,
) -> tuple[otel_context.Context, tuple[int, int] | None]:
    """The context to start the attempt's span in, and the ids to pin (a true root: the root
    task's first attempt in its first ``execution``)."""
    if "traceparent" in carrier:
        extracted = _propagator.extract(dict(carrier), context=otel_context.Context())
        parent = otel_trace.get_current_span(extracted).get_span_context()
        if parent.is_valid:
            return claimed(extracted, parent.trace_id), None
    root = root_id or task_id
    trace_id = int(trace_id_for(root), 16)
    root_span_id = int(root_observation_id_for(root), 16)
    if root == task_id and not retries and execution <= 1:
        return otel_context.Context(), (trace_id, root_span_id)
    parent_span = NonRecordingSpan(SpanContext(
        trace_id, root_span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    context = otel_trace.set_span_in_context(parent_span, otel_context.Context())
    return claimed(context, trace_id), None


def claimed(context: otel_context.Context, trace_id: int) -> otel_context.Context:
    """``context`` with the SDK's root claim for ``trace_id``: spans started in it are never
    marked app roots (their parent is another process's, or already ended)."""
    return baggage.set_baggage(_sdk.root_claim_baggage_key(), f"{trace_id:032x}", context)


def start_task_span(
    tracer: Any, name: str, context: otel_context.Context, pinned: tuple[int, int] | None,
    attributes: Mapping[str, Any],
) -> Any:
    """Start the span in ``context`` (with ``pinned`` ids for a true root, which is also
    marked its trace's app root, as the SDK's processor marks a parentless span)."""
    if pinned is None:
        return tracer.start_span(name, context=context, attributes=attributes)
    root_attributes = {**attributes, _NAMES.IS_APP_ROOT: True}
    if isinstance(tracer, TaskSpanTracer):
        return tracer.start_span(name, context=context, attributes=root_attributes,
                                 pinned=pinned)
    with pinned_ids(*pinned):
        return tracer.start_span(name, context=context, attributes=root_attributes)


def start_attributes(
    as_type: str, input_text: str | None, metadata: Mapping[str, Any],
    environment: str | None, release: str | None, version: str | None = None,
) -> dict[str, Any]:
    """The attributes the SDK would write for a new observation."""
    attributes: dict[str, Any] = {_NAMES.OBSERVATION_TYPE: as_type}
    if version:
        attributes[_NAMES.VERSION] = version
    if input_text is not None:
        attributes[_NAMES.OBSERVATION_INPUT] = input_text
    if environment:
        attributes[_NAMES.ENVIRONMENT] = environment
    if release:
        attributes[_NAMES.RELEASE] = release
    attributes.update(metadata_attributes(metadata))
    return attributes


def end_attributes(
    output_text: str | None, level: str, status_message: str | None,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """The attributes the SDK's ``update(...)`` would write when the attempt ends."""
    attributes: dict[str, Any] = {_NAMES.OBSERVATION_LEVEL: level}
    if output_text is not None:
        attributes[_NAMES.OBSERVATION_OUTPUT] = output_text
    if status_message:
        attributes[_NAMES.OBSERVATION_STATUS_MESSAGE] = status_message
    attributes.update(metadata_attributes(metadata))
    return attributes


def metadata_attributes(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as the v5 SDK writes it: one attribute per key, every value JSON-encoded."""
    names = _metadata_names
    return {names.get(key) or _metadata_name(key): json_text(value)
            for key, value in metadata.items() if value is not None}


_metadata_names: dict[str, str] = {}  # metadata key -> its attribute name (keys are few)


def _metadata_name(key: str) -> str:
    name = f"{_NAMES.OBSERVATION_METADATA}.{key}"
    if len(_metadata_names) < 4096:
        _metadata_names[key] = name
    return name


def json_text(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)``, with
    the same text for a str or an int made without building an encoder (most metadata)."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    return _ENCODER.encode(value)


_encode_str = json.encoder.encode_basestring  # what json.dumps uses with ensure_ascii=False
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


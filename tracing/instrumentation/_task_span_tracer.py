"""Task spans that write their own spool record when they end.

A task attempt's observation used to be an OpenTelemetry SDK span on a provider of its own,
handed at its end to the Langfuse SDK's processor, which handed it to the spool exporter.
Making that span (ids, sampler, limits, attribute cleaning on every ``set_attributes``,
its lock) and the trip through the processor cost about half of what tracing added to a
task. A :class:`TaskSpan` is an OpenTelemetry ``Span`` (the API, so ``get_current_span()``,
``langfuse.update_current_span(...)`` and ``@observe`` children work on it as on any span)
that only keeps its fields, and when it ends writes the compact span record
(``tracing.spool._spanrecord``, version 2) straight into the spool.

What stays exactly as it was, because :class:`TaskSpanTracer` keeps the provider's parts:

* ids: the provider's id generator (pinned ids for a true root, ``_otel.pinned_ids``);
* sampling: the provider's sampler decides at start (OpenTelemetry's default sampler,
  ``ParentBased(ALWAYS_ON)``, by its rule without the call: the parent's flag, or sampled
  for a root); a span it drops is OpenTelemetry's ``NonRecordingSpan`` (its children nest
  and are dropped alike);
* span limits: attribute count (the oldest are evicted, as OpenTelemetry does), attribute
  value length, event count; values a user sets are cleaned by OpenTelemetry's
  ``BoundedAttributes`` (the attributes written here are plain ``str``/``int``/``bool``);
* the record: byte for byte the record the exporter writes for the same span (a test
  compares them).

The SDK processor's end-time rules apply unchanged through a second road: a span whose
record is not written here becomes a ``ReadableSpan`` handed to the processor's ``on_end``
(its export filter, the media and mask transformer, the spool exporter). That road is taken
when the Langfuse client has a ``should_export_span`` or ``mask`` of the user's, when a
string attribute may hold media (the transformer uploads it), or when the record cannot be
encoded.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from tracing.spool._spanrecord import (
    compact_span_record,
    event_fields,
    link_fields,
    parent_flags,
    resource_blob,
    scope_blob,
    trace_state_text,
)

logger = logging.getLogger("celery_langfuse")

_PLAIN = (str, bool, int, float)
_SAMPLED, _NOT_SAMPLED = TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)


class TaskSpanTracer:
    """Starts :class:`TaskSpan` objects the way ``provider``'s tracer would start its spans,
    and writes each one's record when it ends (``spool``), or hands it to ``processor``."""

    def __init__(self, provider: Any, processor: Any, scope: InstrumentationScope,
                 id_generator: Any, limits: Any, route: Callable[[], Any]) -> None:
        self.sampler = provider.sampler
        self.resource = provider.resource
        self.scope = scope
        self.id_generator = id_generator
        self.limits = limits
        self.processor = processor
        # Where an ended span's record may go directly, asked at each end (a later runtime
        # may point the processor at another spool): (the SpoolExporter, an attributes ->
        # bool media check or None), or None for always through the processor.
        self.route = route
        self.blobs = (resource_blob(self.resource), scope_blob(scope))

    def start_span(self, name: str, context: otel_context.Context | None = None,
                   attributes: Mapping[str, Any] | None = None,
                   pinned: tuple[int, int] | None = None) -> Any:
        """A span as the provider's tracer starts one (``pinned``: the trace and span ids of
        a parentless span, as ``_otel.pinned_ids`` gives them)."""
        found = otel_trace.get_current_span(context).get_span_context()
        parent = found if found.is_valid else None
        ids = self.id_generator
        if parent is not None:
            trace_id = parent.trace_id
        else:
            trace_id = pinned[0] if pinned else ids.generate_trace_id()
        if self.sampler is DEFAULT_ON:  # OpenTelemetry's default: the parent decides
            recording = sampled = parent is None or parent.trace_flags.sampled
            trace_state, extra = (parent.trace_state if parent else None), None
        else:
            result = self.sampler.should_sample(context, trace_id, name, SpanKind.INTERNAL,
                                                attributes)
            sampled, recording = result.decision.is_sampled(), result.decision.is_recording()
            trace_state, extra = result.trace_state, result.attributes
        span_context = SpanContext(
            trace_id, pinned[1] if pinned else ids.generate_span_id(), is_remote=False,
            trace_flags=_SAMPLED if sampled else _NOT_SAMPLED, trace_state=trace_state)
        if not recording:
            return NonRecordingSpan(span_context)
        values = dict(attributes or {})
        if extra:
            values.update(extra)
        if self.limits.max_attribute_length is not None:
            values = _cleaned(values, self.limits.max_attribute_length)
        return TaskSpan(self, name, span_context, parent, values)

    def finish(self, span: TaskSpan) -> None:
        """The ended ``span`` into the spool: its record written here, or through the
        processor (see the module docstring)."""
        direct = self.route()
        if direct is not None and not (direct[1] and direct[1](span.attributes)):
            try:
                frame = compact_span_record(span.context.trace_id, span.context.span_id,
                                            self._fields(span))
            except ValueError:
                frame = b""  # a value marshal refuses: the exporter falls back to OTLP
            if frame:
                direct[0].write(frame, 1)
                return
        self.processor.on_end(span.readable())

    def _fields(self, span: TaskSpan) -> tuple[Any, ...]:
        parent = span.parent
        attributes, dropped = span.bounded_attributes()
        code, message = span.status_fields()
        return (
            span.name, 0, parent.span_id.to_bytes(8, "big") if parent else None,
            parent_flags(parent is not None and parent.is_remote), span.start_time,
            span.end_time, code, message, attributes,
            event_fields(span.events) if span.events else (),
            link_fields(span.links) if span.links else (),
            trace_state_text(span.context.trace_state), dropped, span.dropped_events, 0,
            *self.blobs,
        )


def _cleaned(attributes: Mapping[str, Any], max_length: int | None) -> dict[str, Any]:
    """Attributes as OpenTelemetry keeps them: invalid values dropped (with its warning),
    sequences made tuples, strings cut to ``max_length``."""
    return dict(BoundedAttributes(attributes=attributes, immutable=False,
                                  max_value_len=max_length))


class TaskSpan(otel_trace.Span):
    """A task attempt's span: its fields until it ends, then one record (module docstring).

    Read like an SDK ``ReadableSpan`` where the open-attempt record and the Langfuse SDK
    look (``name``, ``parent``, ``start_time``, ``attributes``, ``resource``,
    ``instrumentation_scope``, ``_limits``)."""

    __slots__ = (
        "_limits",
        "_tracer",
        "attributes",
        "context",
        "dropped_events",
        "end_time",
        "events",
        "instrumentation_scope",
        "links",
        "name",
        "parent",
        "resource",
        "start_time",
        "status",
    )

    def __init__(self, tracer: TaskSpanTracer, name: str, context: SpanContext,
                 parent: SpanContext | None, attributes: dict[str, Any]) -> None:
        self._tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.attributes = attributes
        self.events: list[Event] = []
        self.links: list[Link] = []
        self.dropped_events = 0
        self.status = _UNSET
        self.start_time = time.time_ns()
        self.end_time: int | None = None
        self.resource = tracer.resource
        self.instrumentation_scope = tracer.scope
        self._limits = tracer.limits

    # -- the OpenTelemetry Span API ----------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.end_time is not None:
            return
        if all(type(value) in _PLAIN for value in attributes.values()) and (
                self._limits.max_attribute_length is None):
            self.attributes.update(attributes)
        else:
            self.attributes.update(_cleaned(attributes, self._limits.max_attribute_length))

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        if self.end_time is not None:
            return
        if len(self.events) >= (self._limits.max_events or 1 << 31):
            self.dropped_events += 1
            return
        self.events.append(Event(name, _cleaned(attributes or {}, None),
                                 timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self.end_time is None and context.is_valid:
            self.links.append(Link(context, _cleaned(attributes or {}, None)))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """OpenTelemetry's rule: an OK status is final, UNSET never replaces a status."""
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if not isinstance(status, Status):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(self, exception: BaseException,
                         attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        """OpenTelemetry's ``exception`` event."""
        self.add_event("exception", {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped), **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            logger.debug("celery-langfuse: a task span ended twice; the second end is ignored")
            return
        self.end_time = max(end_time or time.time_ns(), self.start_time)
        self._tracer.finish(self)

    # -- the fields of its record ------------------------------------------------------------

    def bounded_attributes(self) -> tuple[dict[str, Any], int]:
        """The attributes within the count limit (the oldest evicted) and how many were."""
        limit = self._limits.max_span_attributes
        excess = len(self.attributes) - limit if limit is not None else 0
        if excess <= 0:
            return self.attributes, 0
        return dict(list(self.attributes.items())[excess:]), excess

    def status_fields(self) -> tuple[int, str | None]:
        status = self.status
        message = status.description if status.status_code is StatusCode.ERROR else None
        return status.status_code.value, message or None

    def readable(self) -> ReadableSpan:
        """This span as the SDK processor takes it."""
        attributes, dropped = self.bounded_attributes()
        bounded = BoundedAttributes(attributes=attributes, immutable=False)
        bounded.dropped = dropped
        return ReadableSpan(
            name=self.name, context=self.context, parent=self.parent, resource=self.resource,
            attributes=bounded, events=tuple(self.events), links=tuple(self.links),
            kind=SpanKind.INTERNAL, status=self.status, start_time=self.start_time,
            end_time=self.end_time, instrumentation_scope=self.instrumentation_scope)


def scope_for(name: str, version: str, public_key: str) -> InstrumentationScope:
    """The instrumentation scope the SDK's tracer for ``public_key`` gives its spans."""
    return InstrumentationScope(name, version, None, {"public_key": public_key})


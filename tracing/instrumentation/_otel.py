"""Our OpenTelemetry pieces: chosen ids for a root span, and the span guard.

**Pinned ids.** A task tree's trace id is derived from its root task id, and its root task
must be a span with *no* parent (the Langfuse v4 server takes a trace's input, output and
metadata only from a span whose parent span id is empty). The SDK's ``trace_context`` can
only give a chosen trace id by inventing a remote parent, so the tracer that creates task
spans gets an id generator that returns the ids pinned by :func:`pinned_ids` for the one
span being started, and random ids otherwise.

**The span guard** is a span processor registered *before* the SDK's own, on the tracer
provider Langfuse uses. It re-parents a span whose local parent Langfuse will never receive
(a span of the application's own tracer, made current inside a task) under the task's span,
so the task tree stays whole and the SDK does not mark the orphan as a second trace root.
(The SDK's span queue no longer exists in a traced process, see ``_pipeline``; the drop
counter still counts any "Queue full" line OpenTelemetry logs, e.g. from an application's
own batch processor sharing the logger.)

**The task context** makes the task's span current, known as the task's span, and carries
the SDK's root claim for its trace: the SDK never sees a task span start (``_pipeline``), so
without the claim it would mark the task's first child an app root.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from tracing import _sdk

logger = logging.getLogger("celery_langfuse")

TASK_SPAN_KEY = otel_context.create_key("celery_langfuse.task_span")
_pinned: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "celery_langfuse_pinned_ids", default=None
)


class PinnedIds(IdGenerator):
    """Ids pinned by :func:`pinned_ids` for the span being started; else the base's."""

    def __init__(self, base: IdGenerator | None = None) -> None:
        self.base = base or RandomIdGenerator()

    def generate_trace_id(self) -> int:
        pinned = _pinned.get()
        return pinned[0] if pinned else self.base.generate_trace_id()

    def generate_span_id(self) -> int:
        pinned = _pinned.get()
        return pinned[1] if pinned and pinned[1] else self.base.generate_span_id()


@contextlib.contextmanager
def pinned_ids(trace_id: int, span_id: int = 0) -> Iterator[None]:
    """Spans started inside get ``trace_id`` (when parentless) and ``span_id`` (if not 0)."""
    token = _pinned.set((trace_id, span_id))
    try:
        yield
    finally:
        _pinned.reset(token)


def pin_ids_on(tracer: Any) -> None:
    """Make ``tracer`` honour :func:`pinned_ids` (idempotent)."""
    current = tracer.id_generator
    if not isinstance(current, PinnedIds):
        tracer.id_generator = PinnedIds(current)


class DropCounter(logging.Filter):
    """Counts OpenTelemetry's "Queue full, dropping span" log records (one per span)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if "Queue full" in str(record.msg):
            with self._lock:
                self.dropped += 1
        return True

    def take(self) -> int:
        if not self.dropped:  # the usual case, read without the lock
            return 0
        with self._lock:
            count, self.dropped = self.dropped, 0
        return count


drop_counter = DropCounter()
logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(drop_counter)


class SpanGuard(SpanProcessor):
    """Keeps task trees whole (see module doc)."""

    def __init__(self, exported: Callable[[ReadableSpan], bool]) -> None:
        self._exported = exported
        self._live: set[int] = set()
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        try:
            self._repair_parent(span, parent_context)
        except Exception:
            logger.debug("celery-langfuse: span guard on_start failed", exc_info=True)

    def _repair_parent(self, span: Span, parent_context: otel_context.Context | None) -> None:
        if not self._expected(span):
            return
        context = span.get_span_context()
        with self._lock:
            self._live.add(context.span_id)
        parent = span.parent
        if parent is None or parent.is_remote:
            return
        with self._lock:
            known = parent.span_id in self._live
        if known:
            return
        task_span: Any = otel_context.get_value(TASK_SPAN_KEY, parent_context)
        if task_span is None:
            return
        task_context = task_span.get_span_context()
        if task_context.span_id == parent.span_id:
            return  # a child of the task's span (made on a provider of its own)
        if task_context.span_id != context.span_id and task_context.trace_id == parent.trace_id:
            _sdk.set_parent(span, task_context)

    def _expected(self, span: ReadableSpan) -> bool:
        try:
            return bool(self._exported(span))
        except Exception:
            return False

    def on_end(self, span: ReadableSpan) -> None:
        context = span.get_span_context()
        if context is not None:
            with self._lock:
                self._live.discard(context.span_id)

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def task_context(span: Any) -> otel_context.Context:
    """A context where ``span`` is current, known as the task's span, and claims its trace's
    app root (so no span started in it is marked one)."""
    claim: dict[str, object] = {_CLAIM_KEY: f"{span.get_span_context().trace_id:032x}"}
    return _sdk.context_with(span, claim, **{TASK_SPAN_KEY: span})


_CLAIM_KEY = _sdk.root_claim_baggage_key()

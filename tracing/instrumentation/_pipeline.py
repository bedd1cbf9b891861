"""The span pipeline in a process that runs tasks: every span is on disk when it ends.

**No batch, no flush.** The Langfuse SDK's span processor is OpenTelemetry's
``BatchSpanProcessor``: ended spans wait in a queue for a background thread, and a task's
spans only reach the spool when that thread wakes or the task end force-flushes the queue.
:class:`SpoolBatch` takes the place of the processor's batch (``_sdk.replace_batch``): the
SDK's processor still decides everything it decides today (project scope,
``should_export_span``, sampling, propagated attributes, app roots), and a span it keeps is
appended to the spool in the thread that ended it, through the same exporter (the SDK's media
and mask transformer for the spans that need it, then the compact record). No queue can
overflow, no export thread runs in a pool child (or, under gevent/eventlet, starves behind a
task that never yields), and task end has nothing to flush.

**The task's own span skips the SDK's start bookkeeping** (when the SDK's provider is the one
``instrument()`` built; on an application's own provider, ``instrument(tracer_provider=...)``,
task spans stay on it, so the application's processors still see them). Task spans are made
on a
tracer provider of their own (:func:`task_span_provider`) with the same sampler, resource,
span limits and the task tracer's pinned ids, whose one processor hands each ended span to
the SDK processor's ``on_end`` (its export rules and the spool), never to its ``on_start``.
What ``on_start`` would have done for a task span is done where the span is made: a task
span starts in a fresh context (no propagated attributes, no skills), and the one app-root
rule that applies, "a parentless task span is its trace's app root", is written by
``_task_span.start_task_span``. Children still nest: the task's span is the current span
while the body runs, and the task context carries the SDK's root claim for its trace, so
the SDK (which never saw the task span start) marks none of them an app root.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from tracing import _sdk
from tracing.instrumentation._otel import PinnedIds

logger = logging.getLogger("celery_langfuse")


class SpoolBatch:
    """Stands where OpenTelemetry's ``BatchProcessor`` stood inside the SDK's span processor:
    ``emit`` exports the span at once, in the calling thread. ``_exporter`` keeps the batch's
    attribute name, so ``_sdk.batch_exporter`` reads it as before."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def emit(self, span: ReadableSpan) -> None:
        try:
            self._exporter.export((span,))
        except Exception:
            # The spool exporter counts its own failures; anything else (the SDK's media
            # transformer) must not reach the code that ended the span.
            logger.exception("celery-langfuse: exporting a span to the spool failed")

    def force_flush(self, timeout_millis: int | None = None) -> bool:
        return True  # nothing is ever held back

    def shutdown(self, timeout_millis: int = 30000) -> None:
        """Spans ending after the SDK's shutdown are still written: nothing is lost."""
        self._exporter.shutdown()


def make_synchronous(processor: Any) -> SpoolBatch:
    """Give the SDK's span processor a :class:`SpoolBatch` on its current exporter; spans
    already queued in its old batch go to the spool first, and the old batch's thread ends."""
    return _sdk.replace_batch(processor, SpoolBatch(_sdk.batch_exporter(processor)))


class TaskSpanEnd(SpanProcessor):
    """The one processor of the task span provider: an ended task span goes through the SDK
    processor's export rules (``on_end``) into the spool; nothing happens at its start."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def on_start(self, span: Any, parent_context: otel_context.Context | None = None) -> None:
        """Nothing: see the module docstring for what the SDK's ``on_start`` would do."""

    def on_end(self, span: ReadableSpan) -> None:
        self._processor.on_end(span)

    def shutdown(self) -> None:
        """The SDK's processor is shut down with its own provider."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def task_span_provider(provider: Any, processor: Any) -> TracerProvider:
    """A provider for task spans, sampling and describing them as ``provider`` does."""
    base_ids = getattr(provider, "id_generator", None)
    own = TracerProvider(
        sampler=provider.sampler,
        resource=provider.resource,
        id_generator=base_ids if isinstance(base_ids, PinnedIds) else PinnedIds(base_ids),
        span_limits=_sdk.span_limits_of(provider),
        shutdown_on_exit=False,
    )
    own.add_span_processor(TaskSpanEnd(processor))
    return own

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

**The task's own span never goes through this processor's start**, and usually not
through its end either: it is a span of our own that writes its own record
(``_task_span_tracer``) when the SDK's provider is the one ``instrument()`` built. On an
application's own provider, ``instrument(tracer_provider=...)``, task spans stay on it, so
the application's processors still see them.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter

from tracing import _sdk

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

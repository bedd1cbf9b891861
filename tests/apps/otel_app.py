"""A Celery app that set up its own OpenTelemetry tracing (and Sentry's) before instrument().

The global ``TracerProvider`` exports the application's spans to a JSON-lines file
(``TEST_APP_SPANS``), and Sentry's OpenTelemetry span processor sits on it too, as apps using
OpenTelemetry, Sentry or Logfire have. celery-langfuse must keep Langfuse's spans out of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import sentry_sdk
from celery import Celery
from langfuse import get_client
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from sentry_sdk.integrations.opentelemetry import SentrySpanProcessor

import tracing


class FileExporter(SpanExporter):
    """The application's own span backend: one JSON line per span, one write each."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        fd = os.open(os.environ["TEST_APP_SPANS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            for span in spans:
                scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
                line = {"name": span.name, "scope": scope,
                        "attributes": sorted((span.attributes or {}).keys())}
                os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS


sentry_events: list[Any] = []
sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", instrumenter="otel",
                traces_sample_rate=1.0, transport=sentry_events.append)
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
provider.add_span_processor(SentrySpanProcessor())
trace.set_tracer_provider(provider)

app = Celery("otel_app", broker=os.environ["CELERY_BROKER_URL"],
             backend=os.environ["CELERY_RESULT_BACKEND"])
app.conf.update(task_default_queue=os.environ["TEST_QUEUE"], worker_prefetch_multiplier=1)
tracing.instrument(app)


@app.task(name="o.nested")
def nested(i: int) -> int:
    """A generation made inside one of the application's own spans."""
    with (
        trace.get_tracer("the-app").start_as_current_span("app-work"),
        get_client().start_as_current_observation(
            as_type="generation", name="llm", model="m", input=f"secret prompt {i}",
        ) as generation,
    ):
        generation.update(output="ok")
    return i

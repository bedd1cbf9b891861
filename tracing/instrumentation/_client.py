"""Wiring the Langfuse SDK to the spool, on a tracer provider of its own.

**A provider of its own.** Left alone, the SDK adds its span processor to the application's
global OpenTelemetry ``TracerProvider`` when one exists (apps using OpenTelemetry, Sentry 3 or
Logfire have one): every Langfuse span, task inputs included, then also goes to the
application's exporter, and ``LANGFUSE_SAMPLE_RATE`` is ignored. So we hand the SDK a
``TracerProvider`` that is not registered globally, with Langfuse's resource attributes, the
sample rate as a trace-id ratio sampler (the decision is the same for every task of a tree),
and our :class:`~tracing.instrumentation._otel.SpanGuard` first in line.
``instrument(tracer_provider=...)`` passes the user's own provider instead.

**Whoever came first.** The SDK keeps one resource manager per public key per process and
the first constructor wins: a ``Langfuse(...)`` or ``get_client()`` call at import time,
before ``instrument()`` ran, fixes the provider and the OTLP network exporter for the life
of the process. So instead of relying on being first, we find the SDK's span processor for
our key and point its batch processor at the spool exporter (and shorten its schedule, so a
killed process loses at most about ``flush_interval`` of spans). Spans from ``@observe``,
``langfuse.openai`` and LangChain callbacks all pass through that processor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from langfuse import Langfuse
from langfuse.span_filter import is_default_export_span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from tracing import _sdk
from tracing._config import Config
from tracing._sdk import LangfuseWiringError
from tracing.instrumentation._otel import SpanGuard, pin_ids_on

__all__ = ["LangfuseWiringError", "attach_langfuse", "task_tracer"]

logger = logging.getLogger("celery_langfuse")


def attach_langfuse(config: Config, exporter: SpanExporter) -> tuple[Langfuse, Any]:
    """A Langfuse client whose spans go to ``exporter``; returns (client, span processor)."""
    _sdk.check_sdk()
    public_key = config.public_key or ""
    existed = _sdk.client_exists(public_key)
    provider = None if existed else (config.tracer_provider or _own_provider(config))
    client = Langfuse(
        public_key=config.public_key,
        secret_key=config.secret_key,
        base_url=config.base_url,
        environment=config.environment,
        release=config.release,
        sample_rate=config.sample_rate,
        flush_interval=config.flush_interval,
        span_exporter=exporter,
        tracer_provider=provider,
        should_export_span=config.should_export_span,
        mask=config.mask,
    )
    provider = _sdk.tracer_provider_of(public_key)
    processor = _sdk.langfuse_processor(provider, public_key)
    if existed:
        logger.info("celery-langfuse: a Langfuse client existed before instrument(); "
                    "redirecting its spans to the spool")
    transformer = _sdk.redirect_batch(processor, exporter, config.flush_interval)
    if transformer is not None:
        # The SDK wraps the exporter to upload media and apply masks; keep that wrapper, but
        # only for spans it can change: cloning every span costs ~100 µs per task.
        _sdk.set_batch_exporter(processor, MediaRouter(transformer, exporter))
    exported = config.should_export_span or is_default_export_span
    _sdk.put_processor_first(provider, SpanGuard(exported, processor.force_flush))
    return client, processor


def task_tracer(public_key: str) -> Any:
    """The tracer task spans are made with: the SDK's own (same scope, so its processor
    exports them), honouring :func:`~tracing.instrumentation._otel.pinned_ids`."""
    provider = _sdk.tracer_provider_of(public_key)
    if provider is None:
        raise LangfuseWiringError(f"no Langfuse client for public key {public_key!r}")
    cached = _tracers.get(public_key)
    if cached is not None and cached[0] is provider:
        return cached[1]
    tracer = provider.get_tracer(_sdk.TRACER_NAME, _sdk.sdk_version(),
                                 attributes={"public_key": public_key})
    pin_ids_on(tracer)
    _tracers[public_key] = (provider, tracer)
    return tracer


_tracers: dict[str, tuple[Any, Any]] = {}


def _own_provider(config: Config) -> TracerProvider:
    names = _sdk.attribute_names()
    resource = {names.ENVIRONMENT: config.environment, names.RELEASE: config.release}
    sampler = TraceIdRatioBased(config.sample_rate) if config.sample_rate < 1 else None
    return TracerProvider(
        resource=Resource.create({k: v for k, v in resource.items() if v is not None}),
        sampler=sampler,
    )


# What the SDK's media processing looks for (``langfuse/_client/span_exporter.py``): base64
# data URIs, serialized media objects and Langfuse media references. A superset is fine.
_MEDIA = re.compile(r"data:|inline_?[dD]ata|media_type|mime_?[tT]ype|@@@langfuseMedia")


class MediaRouter(SpanExporter):
    """Send through the SDK's transforming exporter only the spans it could transform.

    The result is a failure when either part failed, so a failed spool write is never
    reported as a success.
    """

    def __init__(self, transformer: Any, spool: SpanExporter) -> None:
        self.transformer = transformer
        self.spool = spool

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if _sdk.transformer_masks(self.transformer):
            return self.transformer.export(spans)
        plain: list[ReadableSpan] = []
        media: list[ReadableSpan] = []
        for span in spans:
            (media if _may_hold_media(span) else plain).append(span)
        results = []
        if plain:
            results.append(self.spool.export(plain))
        if media:
            results.append(self.transformer.export(media))
        ok = all(result == SpanExportResult.SUCCESS for result in results)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.spool.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _may_hold_media(span: ReadableSpan) -> bool:
    for value in (span.attributes or {}).values():
        if isinstance(value, str):
            if _MEDIA.search(value):
                return True
        elif isinstance(value, (list, tuple)) and any(
            isinstance(item, str) and _MEDIA.search(item) for item in value
        ):
            return True
    return False


"""Wiring the Langfuse SDK to the spool, whoever created the client first.

The SDK keeps one resource manager per public key per process and the first constructor
wins: a ``Langfuse(...)`` or ``get_client()`` call at import time, before ``instrument()``
ran, would fix the OTLP network exporter for the life of the process. So instead of relying
on being first, we find the SDK's span processor for our public key and point its batch
processor at the spool exporter (and shorten its schedule delay, so a killed process loses
at most about ``flush_interval`` of spans). Spans from ``@observe``, ``langfuse.openai`` and
LangChain callbacks all pass through that processor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from langfuse import Langfuse
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracing._config import Config

logger = logging.getLogger("celery_langfuse")


class LangfuseWiringError(RuntimeError):
    """The Langfuse SDK's span processor could not be found to redirect it to the spool."""


def attach_langfuse(config: Config, exporter: SpanExporter) -> tuple[Langfuse, Any]:
    """A Langfuse client whose spans go to ``exporter``; returns (client, span processor)."""
    from langfuse._client.resource_manager import LangfuseResourceManager

    existed = config.public_key in LangfuseResourceManager._instances
    client = Langfuse(
        public_key=config.public_key,
        secret_key=config.secret_key,
        base_url=config.base_url,
        environment=config.environment,
        release=config.release,
        sample_rate=config.sample_rate,
        flush_interval=config.flush_interval,
        span_exporter=exporter,
    )
    manager = LangfuseResourceManager._instances.get(config.public_key or "")
    processor = _langfuse_processor(manager, config.public_key or "")
    if existed:
        logger.info("celery-langfuse: a Langfuse client existed before instrument(); "
                    "redirecting its spans to the spool")
    _redirect(processor, exporter, config.flush_interval)
    return client, processor


def _langfuse_processor(manager: Any, public_key: str) -> Any:
    from langfuse._client.span_processor import LangfuseSpanProcessor

    provider = getattr(manager, "tracer_provider", None)
    multi = getattr(provider, "_active_span_processor", None)
    for processor in getattr(multi, "_span_processors", ()):
        if isinstance(processor, LangfuseSpanProcessor) and processor.public_key == public_key:
            return processor
    raise LangfuseWiringError(
        "celery-langfuse could not find the Langfuse SDK's span processor for public key "
        f"{public_key!r} (is LANGFUSE_TRACING_ENABLED=false, or the SDK version unsupported?)"
    )


def _redirect(processor: Any, exporter: SpanExporter, flush_interval: float) -> None:
    from langfuse._client.span_exporter import LangfuseTransformingSpanExporter

    batch = processor._batch_processor
    current = batch._exporter
    if isinstance(current, LangfuseTransformingSpanExporter):
        # The SDK wraps the exporter to upload media and apply masks; keep that wrapper, but
        # only for spans it can change: cloning every span costs ~100 µs per task.
        current._exporter = exporter
        batch._exporter = MediaRouter(current, exporter)
    else:
        batch._exporter = exporter
    batch._schedule_delay = flush_interval
    batch._schedule_delay_millis = flush_interval * 1000


# What the SDK's media processing looks for (``langfuse/_client/span_exporter.py``): base64
# data URIs, serialized media objects and Langfuse media references. A superset is fine.
_MEDIA = re.compile(r"data:|inline_?[dD]ata|media_type|mime_?[tT]ype|@@@langfuseMedia")


class MediaRouter(SpanExporter):
    """Send through the SDK's transforming exporter only the spans it could transform."""

    def __init__(self, transformer: Any, spool: SpanExporter) -> None:
        self.transformer = transformer
        self.spool = spool

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.transformer._mask_otel_spans is not None:
            return self.transformer.export(spans)
        plain: list[ReadableSpan] = []
        media: list[ReadableSpan] = []
        for span in spans:
            (media if _may_hold_media(span) else plain).append(span)
        result = self.spool.export(plain) if plain else SpanExportResult.SUCCESS
        if media:
            result = self.transformer.export(media)
        return result

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

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
from typing import Any

from langfuse import Langfuse
from opentelemetry.sdk.trace.export import SpanExporter

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
    # The SDK wraps the exporter to upload media and apply masks; keep that wrapper.
    if isinstance(current, LangfuseTransformingSpanExporter):
        current._exporter = exporter
    else:
        batch._exporter = exporter
    batch._schedule_delay = flush_interval
    batch._schedule_delay_millis = flush_interval * 1000

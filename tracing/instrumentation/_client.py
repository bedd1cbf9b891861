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
our key, point its batch at the spool exporter, and then replace the batch by a synchronous
one (``_pipeline``): every span the processor keeps is in the spool when it ends. Spans from
``@observe``, ``langfuse.openai`` and LangChain callbacks all pass through that processor;
task spans write their own record (``_task_span_tracer``), or go to the same processor's
``on_end`` when its rules must see them.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from langfuse import Langfuse
from langfuse.span_filter import is_default_export_span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from tracing import _sdk
from tracing._config import Config
from tracing._sdk import LangfuseWiringError
from tracing.instrumentation._otel import PinnedIds, SpanGuard, pin_ids_on
from tracing.instrumentation._pipeline import make_synchronous
from tracing.instrumentation._task_span_tracer import TaskSpanTracer, scope_for
from tracing.spool._exporter import SpoolExporter

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
    earlier = _sdk.batch_exporter(processor)
    if isinstance(earlier, MediaRouter):  # an earlier runtime's road: keep the SDK's wrapper
        _sdk.set_batch_exporter(processor, earlier.transformer)
    transformer = _sdk.redirect_batch(processor, exporter, config.flush_interval)
    if transformer is not None:
        # The SDK wraps the exporter to upload media and apply masks; keep that wrapper, but
        # only for spans it can change: cloning every span costs ~100 µs per task.
        _sdk.set_batch_exporter(processor, MediaRouter(transformer, exporter))
    make_synchronous(processor)
    if not existed and config.tracer_provider is None:
        # Task spans may write their own records unless the user's filter or mask (baked
        # into this client) must see them.
        _owned[provider] = config.should_export_span is None and config.mask is None
    exported = config.should_export_span or is_default_export_span
    _sdk.put_processor_first(provider, SpanGuard(exported))
    return client, processor


def task_tracer(public_key: str) -> Any:
    """The tracer task spans are made with, honouring
    :func:`~tracing.instrumentation._otel.pinned_ids`: on a provider ``attach_langfuse`` built,
    a :class:`TaskSpanTracer` (the SDK's scope, the provider's sampler, ids and limits; the
    SDK's processor never sees a task span start); else the provider's own tracer."""
    provider = _sdk.tracer_provider_of(public_key)
    if provider is None:
        raise LangfuseWiringError(f"no Langfuse client for public key {public_key!r}")
    resource = getattr(provider, "resource", None)
    cached = _tracers.get(public_key)
    # A new resource (OpenTelemetry updates it after a fork) means a new task span provider,
    # so task spans always carry the resource the SDK's own spans carry in this process.
    if cached is not None and cached[0] is provider and cached[1] is resource:
        return cached[2]
    direct = _owned.get(provider)
    if direct is not None:
        processor = _sdk.langfuse_processor(provider, public_key)
        base_ids = getattr(provider, "id_generator", None)
        tracer: Any = TaskSpanTracer(
            provider, processor, scope_for(_sdk.TRACER_NAME, _sdk.sdk_version(), public_key),
            base_ids if isinstance(base_ids, PinnedIds) else PinnedIds(base_ids),
            _sdk.span_limits_of(provider) or SpanLimits(),
            (lambda: _direct_route(processor)) if direct else _no_route)
    else:  # the application's provider (or a client's from before instrument()): task spans
        # go through every processor on it, as any other span
        tracer = provider.get_tracer(_sdk.TRACER_NAME, _sdk.sdk_version(),
                                     attributes={"public_key": public_key})
        pin_ids_on(tracer)
    _tracers[public_key] = (provider, resource, tracer)
    return tracer


_tracers: dict[str, tuple[Any, Any, Any]] = {}
# Providers attach_langfuse built: nothing but the SDK's processor (and our guard) is on them,
# so task spans skip them (``_task_span_tracer``); with whether a task span may write its
# own record (the user's should_export_span or mask must see it otherwise).
_owned: weakref.WeakKeyDictionary[TracerProvider, bool] = weakref.WeakKeyDictionary()


def _direct_route(processor: Any) -> tuple[Any, Any] | None:
    """Where a task span may write its own record now: the spool exporter the SDK processor
    exports to, with the media check its attributes need first when the SDK's media
    transformer is on the road; None when the transformer masks every span (or the road is
    not one we built)."""
    exporter = _sdk.batch_exporter(processor)
    if isinstance(exporter, SpoolExporter):
        return exporter, None
    if isinstance(exporter, MediaRouter) and not _sdk.transformer_masks(exporter.transformer):
        return exporter.spool, may_hold_media
    return None


def _no_route() -> None:
    return None


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
            (media if may_hold_media(span.attributes or {}) else plain).append(span)
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


def may_hold_media(attributes: Mapping[str, Any]) -> bool:
    """Whether any string among ``attributes``' values (or in a sequence value) may be
    something the SDK's media processing replaces: one scan of all of them joined by NUL,
    which no pattern the check looks for contains."""
    texts: list[str] = []
    for value in attributes.values():
        if type(value) is str:
            texts.append(value)
        elif isinstance(value, (list, tuple)):
            texts.extend(item for item in value if isinstance(item, str))
    return _may_be_media("\0".join(texts))


def _may_be_media(text: str) -> bool:
    # Every alternative of _MEDIA contains "ata", "ype" or "@@@": three substring scans
    # rule out most text faster than the pattern does.
    return ("ata" in text or "ype" in text or "@@@" in text) and _MEDIA.search(text) is not None


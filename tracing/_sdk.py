"""Every private name of the Langfuse SDK and the OpenTelemetry SDK that we touch, in one place.

celery-langfuse makes the SDK's spans durable by rewiring a few of its internals; nothing
else in the package reaches behind a public API. Each accessor below names what it depends
on, and ``tests/test_sdk_contract.py`` has one contract test per accessor that fails with a
message naming the installed langfuse version when the SDK changes shape. ``check_sdk()``
runs the same checks at ``instrument()``, so an unrecognised SDK is refused with a clear
error instead of tracing into the void.

=============================================  =============================================
private name                                   why
=============================================  =============================================
``LangfuseResourceManager._instances``         is there already a client for this key?
``TracerProvider._active_span_processor``      find the SDK's span processor; put ours first
``._span_processors``
``LangfuseSpanProcessor._batch_processor``     point its batch at the spool exporter, then
``._exporter`` / ``._schedule_delay``           replace the batch with a synchronous one
``BatchProcessor.force_flush`` / ``.shutdown``  (``_pipeline.SpoolBatch``): move what it queued,
                                               end its thread
``TracerProvider._span_limits``                task spans get the SDK provider's span limits
``LangfuseTransformingSpanExporter``           its wrapped exporter and its mask (media and
``._exporter`` / ``._mask_otel_spans``           masks stay the SDK's job)
``Langfuse._otel_tracer``                      the tracer of a client built before us
``LangfuseSpan._otel_span``                    the OTel span of an SDK observation
``opentelemetry.sdk.trace.Span._parent``       re-parent a span whose parent Langfuse never
                                               receives (another tracer's span)
``langfuse._client.attributes``                the attribute names the SDK writes
``langfuse._client.propagation``               the baggage key of the SDK's root claim
``langfuse._client.get_client``                the public key ``get_client()`` picks in a
``._current_public_key``                        context (an eager task's client, as
                                               ``@observe`` binds it)
``opentelemetry.trace.propagation._SPAN_KEY``  a task's context built in one step instead
``opentelemetry.baggage._BAGGAGE_KEY``           of three copies (current span, baggage, ours)
=============================================  =============================================
"""

from __future__ import annotations

import re
from typing import Any

from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation import _SPAN_KEY

SUPPORTED_RANGE = ">=5.0,<6"
TRACER_NAME = "langfuse-sdk"


class LangfuseWiringError(RuntimeError):
    """The installed Langfuse SDK does not have the internals celery-langfuse relies on."""


def sdk_version() -> str:
    from langfuse._version import __version__

    return str(__version__)


def _unsupported(what: str) -> LangfuseWiringError:
    return LangfuseWiringError(
        f"celery-langfuse does not recognise langfuse {sdk_version()}: {what}. Supported: "
        f"langfuse{SUPPORTED_RANGE}; install a version in that range "
        "(pip install 'langfuse>=5.0,<6')."
    )


def check_sdk() -> None:
    """Refuse an SDK version or shape the wiring was not written for."""
    match = re.match(r"(\d+)\.", sdk_version())
    if not match or int(match.group(1)) != 5:
        raise _unsupported("only the 5.x series is supported")
    try:
        from langfuse._client.attributes import LangfuseOtelSpanAttributes
        from langfuse._client.propagation import LANGFUSE_TRACE_ID_BAGGAGE_KEY  # noqa: F401
        from langfuse._client.resource_manager import LangfuseResourceManager
        from langfuse._client.span_exporter import LangfuseTransformingSpanExporter  # noqa: F401
        from langfuse._client.span_processor import LangfuseSpanProcessor  # noqa: F401
    except ImportError as exc:
        raise _unsupported(f"missing module ({exc})") from None
    if not isinstance(getattr(LangfuseResourceManager, "_instances", None), dict):
        raise _unsupported("LangfuseResourceManager._instances is gone")
    for name in ("OBSERVATION_TYPE", "OBSERVATION_INPUT", "OBSERVATION_OUTPUT",
                 "OBSERVATION_METADATA", "OBSERVATION_LEVEL", "OBSERVATION_STATUS_MESSAGE",
                 "ENVIRONMENT", "RELEASE", "VERSION", "IS_APP_ROOT"):
        if not hasattr(LangfuseOtelSpanAttributes, name):
            raise _unsupported(f"span attribute name {name} is gone")


# -- the resource manager: one client per public key per process ------------------------------

def _instances() -> dict[str, Any]:
    from langfuse._client.resource_manager import LangfuseResourceManager

    return LangfuseResourceManager._instances


def client_exists(public_key: str) -> bool:
    """True when this process already built a Langfuse client for ``public_key``."""
    return public_key in _instances()


def forget_client(public_key: str) -> None:
    """Drop the SDK's per-key singleton (tests and benchmarks build several in one process)."""
    _instances().pop(public_key, None)


def tracer_provider_of(public_key: str) -> Any:
    manager = _instances().get(public_key)
    return getattr(manager, "tracer_provider", None)


# -- span processors -------------------------------------------------------------------------

def span_processors(provider: Any) -> tuple[Any, ...]:
    multi = getattr(provider, "_active_span_processor", None)
    return tuple(getattr(multi, "_span_processors", ()))


def put_processor_first(provider: Any, processor: Any) -> None:
    """Register ``processor`` so it runs before every processor already on ``provider``."""
    multi = provider._active_span_processor
    with multi._lock:
        multi._span_processors = (processor, *multi._span_processors)


def langfuse_processor(provider: Any, public_key: str) -> Any:
    from langfuse._client.span_processor import LangfuseSpanProcessor

    for processor in span_processors(provider):
        if isinstance(processor, LangfuseSpanProcessor) and processor.public_key == public_key:
            return processor
    raise LangfuseWiringError(
        "celery-langfuse could not find the Langfuse SDK's span processor for public key "
        f"{public_key!r} (is LANGFUSE_TRACING_ENABLED=false?)"
    )


def redirect_batch(processor: Any, exporter: Any, flush_interval: float) -> Any:
    """Point the processor's batch at ``exporter`` with a short schedule; returns the SDK's
    transforming exporter (media upload, masks) if it wraps one, else None."""
    from langfuse._client.span_exporter import LangfuseTransformingSpanExporter

    batch = processor._batch_processor
    current = batch._exporter
    batch._schedule_delay = flush_interval
    batch._schedule_delay_millis = flush_interval * 1000
    if isinstance(current, LangfuseTransformingSpanExporter):
        current._exporter = exporter
        return current
    batch._exporter = exporter
    return None


def replace_batch(processor: Any, batch: Any) -> Any:
    """Put ``batch`` (an object with ``emit``, ``force_flush`` and ``shutdown``) in place of
    the processor's OpenTelemetry ``BatchProcessor``. Spans the old batch still holds are
    exported through its exporter first; then its thread is ended, exporting nothing more.
    Returns ``batch``."""
    old = processor._batch_processor
    processor._batch_processor = batch
    old.force_flush()
    old._exporter = _NothingMore()
    old.shutdown()
    return batch


class _NothingMore:
    """The exporter a replaced batch is left with: it has nothing left to export."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


def span_limits_of(provider: Any) -> Any:
    """The span limits ``provider`` applies (None, the defaults, if it has none)."""
    return getattr(provider, "_span_limits", None)


def set_batch_exporter(processor: Any, exporter: Any) -> None:
    processor._batch_processor._exporter = exporter


def batch_exporter(processor: Any) -> Any:
    return processor._batch_processor._exporter


def transformer_masks(transformer: Any) -> bool:
    """True when the SDK's transforming exporter applies a user mask to every span."""
    return transformer._mask_otel_spans is not None


# -- spans -----------------------------------------------------------------------------------

def client_tracer(client: Any) -> Any:
    """The OpenTelemetry tracer a Langfuse client creates its observations with."""
    return client._otel_tracer


def otel_span(observation: Any) -> Any:
    """The OpenTelemetry span under an SDK observation (``LangfuseSpan`` and friends)."""
    return observation._otel_span


def set_parent(span: Any, parent: SpanContext) -> None:
    """Give a live (not yet ended) SDK span another parent; its ids stay the same."""
    span._parent = parent


def attribute_names() -> Any:
    """``LangfuseOtelSpanAttributes``: the attribute names the SDK writes on spans."""
    from langfuse._client.attributes import LangfuseOtelSpanAttributes

    return LangfuseOtelSpanAttributes


def root_claim_baggage_key() -> str:
    """Baggage key by which a parent claims the app root (the SDK then marks no child)."""
    from langfuse._client.propagation import LANGFUSE_TRACE_ID_BAGGAGE_KEY

    return str(LANGFUSE_TRACE_ID_BAGGAGE_KEY)


def bind_public_key(public_key: str) -> Any:
    """Make ``get_client()`` (no key) return the client of ``public_key`` in this context, as
    ``@observe`` does; returns the token :func:`unbind_public_key` takes."""
    from langfuse._client.get_client import _current_public_key

    return _current_public_key.set(public_key)


def unbind_public_key(token: Any) -> None:
    from langfuse._client.get_client import _current_public_key

    _current_public_key.reset(token)


def context_with(span: Any, baggage: dict[str, object], **values: Any) -> Any:
    """A fresh OpenTelemetry context where ``span`` is current, ``baggage`` is the whole
    baggage and each of ``values`` (context keys) is set: what ``set_span_in_context``,
    ``baggage.set_baggage`` and ``context.set_value`` make one copy at a time."""
    return Context({_SPAN_KEY: span, _BAGGAGE_KEY: baggage, **values})

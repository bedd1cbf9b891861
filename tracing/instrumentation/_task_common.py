"""What every task signal handler shares: never raising, outcomes, and making a task's span.

The handlers that see a task run (``_task_tracing``) and those that see only its end from the
worker's main process (``_task_elsewhere``) both make task observations the same way: with
``start_span`` (placed by the trace model of ``_task_span``), ended with an :class:`Outcome`.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import trace as otel_trace

from tracing.instrumentation import _runtime
from tracing.instrumentation._client import task_tracer
from tracing.instrumentation._options import TaskOptions
from tracing.instrumentation._payload import clean_text, render_attribute
from tracing.instrumentation._task_span import placement, start_attributes, start_task_span

logger = logging.getLogger("celery_langfuse")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
_TRACEBACK_LIMIT = 8000


def never_raises(handler: F) -> F:
    """Run a signal handler so that its own failure is logged, never raised into Celery."""

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except Exception:
            logger.exception("celery-langfuse: %s failed; the task is unaffected",
                             handler.__name__)
            return None

    return guarded  # type: ignore[return-value]


@dataclass
class Outcome:
    """How an attempt ended: its Langfuse level, status message and extra metadata."""

    level: str = "DEFAULT"
    status_message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def start_span(
    name: str, task_id: str, root_id: str | None, retries: int, carrier: Mapping[str, str],
    as_type: str, *, input_text: str | None, metadata: Mapping[str, Any],
    options: TaskOptions | None = None, version: str | None = None, execution: int = 1,
) -> Any:
    """Start a task attempt's span where the trace model puts it (see ``_task_span``)."""
    runtime = _runtime.current()
    assert runtime is not None
    config = runtime.config
    context, pinned = placement(carrier, task_id, root_id, retries, execution)
    attributes = start_attributes(
        as_type, input_text, metadata,
        (options and options.environment) or config.environment,
        (options and options.release) or config.release, version)
    return start_task_span(task_tracer(config.public_key or ""), clean_text(name) or "", context,
                           pinned, attributes)


def safely(what: str, fallback: T, make: Callable[[], T]) -> T:
    """``make()``, or ``fallback`` (logged) if it raises: the observation is made anyway."""
    try:
        return make()
    except Exception:
        logger.exception("celery-langfuse: %s failed; the task is unaffected", what)
        return fallback


def render(value: Any) -> str:
    """Task input/output as JSON text (masked, redacted, capped); never raises."""
    runtime = _runtime.current()
    assert runtime is not None
    config = runtime.config
    if config.mask is not None:
        try:
            value = config.mask(data=value)
        except Exception:
            logger.exception("celery-langfuse: the mask function failed; value withheld")
            return "<withheld: mask failed>"
    return render_attribute(value, redact=config.redact_keys,
                            max_bytes=config.max_payload_bytes)


def mark_error(span: Any, outcome: Outcome) -> None:
    """An ERROR observation also carries OpenTelemetry's error status, for other backends."""
    if outcome.level == "ERROR":
        status = otel_trace.Status(otel_trace.StatusCode.ERROR,
                                   clean_text(outcome.status_message))
        span.set_status(status)


def describe(exception: Any) -> str:
    """``ExcType: message`` for an exception (Langfuse keeps no span events)."""
    if isinstance(exception, BaseException):
        return f"{type(exception).__name__}: {exception}".rstrip(": ")
    return str(exception)


def traceback_text(einfo: Any, exception: BaseException | None) -> str:
    text = str(getattr(einfo, "traceback", "") or "")
    if not text and exception is not None:
        text = "".join(traceback.format_exception(exception))
    return text[-_TRACEBACK_LIMIT:]

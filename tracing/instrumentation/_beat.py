"""Periodic tasks sent by ``celery beat``: each run starts a trace named after its schedule entry.

Beat runs the same app module as the workers, so ``instrument(app)`` ran there too. On
``beat_init`` we wrap the scheduler's ``apply_async`` so every entry it sends goes out inside
:func:`~tracing.trace_attributes` with the entry's name as the trace name, the tag ``beat``
and the entry's name and schedule as trace metadata: all periodic runs of one task no longer
look alike, and each run is a trace of its own (Celery gives it its own root id). Beat only
publishes: it needs no Langfuse keys and creates no spool.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import signals

from tracing.instrumentation._propagation import trace_attributes

logger = logging.getLogger("celery_langfuse")

BEAT_TAG = "beat"


def connect_beat_handler() -> None:
    signals.beat_init.connect(_on_beat_init, weak=False, dispatch_uid="celery_langfuse.beat")


def _on_beat_init(sender: Any = None, **_: Any) -> None:
    try:
        scheduler = sender.scheduler
        if not getattr(scheduler.apply_async, "_celery_langfuse", False):
            scheduler.apply_async = traced_apply(scheduler.apply_async)
    except Exception:  # tracing never breaks beat
        logger.exception("celery-langfuse: could not trace celery beat's entries")


def traced_apply(apply_async: Any) -> Any:
    """Wrap ``Scheduler.apply_async(entry, ...)`` to send inside the entry's attributes."""

    @functools.wraps(apply_async)
    def apply(entry: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(getattr(entry, "name", None) or getattr(entry, "task", "beat"))
        metadata = {"beat_entry": name, "beat_schedule": str(getattr(entry, "schedule", ""))}
        with trace_attributes(trace_name=name, tags=[BEAT_TAG], metadata=metadata):
            return apply_async(entry, *args, **kwargs)

    apply._celery_langfuse = True  # type: ignore[attr-defined]
    return apply

"""Celery remote control: ``inspect langfuse_status`` and ``control langfuse_flush``.

The Celery-native form of a status/flush endpoint: every running worker answers over the
broker, so an operator sees and steers tracing across a fleet with Celery's own CLI::

    celery -A worker inspect langfuse_status
    celery -A worker control langfuse_flush

Registered when ``tracing`` is imported by ``instrument()``. The handlers run on the worker's
consumer loop, so they never wait and never read the spool (it can hold a gigabyte): they
answer from the state the shipper keeps (``Shipper.state()``, updated every cycle) within
microseconds, and a flush only asks the shipper to ship now.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from tracing.instrumentation import _runtime


@inspect_command()
def langfuse_status(state: Any) -> dict[str, Any]:
    """Tracing state of this worker: configuration and the shipper's kept counters."""
    runtime = _runtime.current()
    if runtime is None:
        return {"tracing": "off (no keys, disabled, or the spool could not be opened)"}
    shipper = runtime.shipper
    kept = shipper.state() if shipper is not None else None
    return {
        "tracing": "on",
        "config": runtime.config.masked(),
        "spool": {
            "directory": str(runtime.config.spool_dir),
            "unshipped_bytes": kept["pending_bytes"] if kept else None,
        },
        "shipper": kept,
        "dropped_spans_at_write": runtime.exporter.dropped_spans,
    }


@control_command(args=[("timeout", float)], signature="[timeout=5]")
def langfuse_flush(state: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Move this process's spans to the spool and have the shipper ship now.

    Answers at once (``timeout`` is accepted for compatibility and not waited on): waiting
    here would stall the worker's consumer loop. ``pending_bytes`` is as of the shipper's last
    cycle; ask ``inspect langfuse_status`` again to see it fall.
    """
    runtime = _runtime.current()
    if runtime is None:
        return {"ok": False, "error": "tracing is off in this worker"}
    runtime.flush()
    shipper = runtime.shipper
    if shipper is None:
        return {"ok": True, "shipped": "another process ships this spool"}
    shipper.wake()
    kept = shipper.state()
    return {"ok": True, "requested": True, "pending_bytes": kept["pending_bytes"],
            "shipped_spans": kept["shipped_spans"], "last_error": kept["last_error"]}

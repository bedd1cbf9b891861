"""Celery remote control: ``inspect langfuse_status`` and ``control langfuse_flush``.

The Celery-native form of a status/flush endpoint: every running worker answers over the
broker, so an operator sees and steers tracing across a fleet with Celery's own CLI::

    celery -A worker inspect langfuse_status
    celery -A worker control langfuse_flush

Registered when ``tracing`` is imported by ``instrument()``; the handlers run in the worker's
main process, which holds the shipper.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from celery.worker.control import control_command, inspect_command

from tracing import _runtime
from tracing._cli import spool_report


@inspect_command()
def langfuse_status(state: Any) -> dict[str, Any]:
    """Tracing state of this worker: configuration, spool and shipper counters."""
    runtime = _runtime.current()
    if runtime is None:
        return {"tracing": "off (no keys, disabled, or the spool could not be opened)"}
    shipper = runtime.shipper
    return {
        "tracing": "on",
        "config": runtime.config.masked(),
        "spool": spool_report(runtime.config.spool_dir),
        "shipper": asdict(shipper.stats) if shipper is not None else None,
        "dropped_spans_at_write": runtime.exporter.dropped_spans,
    }


@control_command(args=[("timeout", float)], signature="[timeout=5]")
def langfuse_flush(state: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Flush this process's spans to the spool and ship, waiting at most ``timeout`` s."""
    runtime = _runtime.current()
    if runtime is None:
        return {"ok": False, "error": "tracing is off in this worker"}
    runtime.flush()
    shipper = runtime.shipper
    if shipper is None:
        return {"ok": True, "shipped": "another process ships this spool"}
    deadline = time.monotonic() + float(timeout)
    shipper.wake()
    while shipper.pending_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
        shipper.wake()
    pending = shipper.pending_bytes()
    return {"ok": pending == 0, "pending_bytes": pending,
            "shipped_spans": shipper.stats.shipped_spans, "last_error": shipper.stats.last_error}

"""The shipper's counters: kept in memory, answered by ``inspect langfuse_status`` without
touching the spool, and written to ``{spool_dir}/shipper-status.json`` for the CLI."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("celery_langfuse")

STATUS_FILE = "shipper-status.json"


@dataclass
class ShipperStats:
    """Counters a status command and the logs report; written to ``shipper-status.json``."""

    shipped_spans: int = 0
    requests: int = 0
    dead_lettered: int = 0
    dropped_at_cap: int = 0
    corrupt_records: int = 0
    torn_tails: int = 0
    attempts_closed: int = 0
    last_status: int | None = None
    last_error: str | None = None
    last_success_at: float | None = None
    paused: str | None = None
    pending_bytes: int = 0
    # Spans dropped before they reached the spool, reported by the processes that dropped
    # them (``KIND_DROPPED`` records), by cause: e.g. ``sdk_queue_full``.
    dropped_in_writers: dict[str, int] = field(default_factory=dict)


def write_status(spool_dir: Path, stats: ShipperStats, **extra: Any) -> None:
    """Replace the status file atomically; a failure is only logged at debug level."""
    status = {**asdict(stats), "pid": os.getpid(), "updated_at": time.time(), **extra}
    tmp = spool_dir / f".{STATUS_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(status))
        os.replace(tmp, spool_dir / STATUS_FILE)
    except OSError:
        logger.debug("celery-langfuse: could not write %s", STATUS_FILE, exc_info=True)


def read_status(spool_dir: Path) -> dict[str, Any] | None:
    """The last status a shipper wrote, or None."""
    try:
        data: dict[str, Any] = json.loads((spool_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data

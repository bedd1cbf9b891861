"""The shipper's counters: kept in memory, answered by ``inspect langfuse_status`` without
touching the spool, and written to ``{spool_dir}/shipper-status.json`` for the CLI.

The status file is JSON padded with spaces to a fixed size (``STATUS_FILE_SIZE``, more if the
JSON needs it): once it exists, each update overwrites its bytes in place, which allocates
nothing, so the status stays current on a full disk. A reader that catches an update half
done sees invalid JSON and reads again (``read_status``) or keeps its last good copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracing.spool import write_all_at

logger = logging.getLogger("celery_langfuse")

STATUS_FILE = "shipper-status.json"
STATUS_FILE_SIZE = 16384


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
    # Spans dropped before they reached the spool, by cause: reported by the processes that
    # dropped them in ``KIND_DROPPED`` records (``sdk_queue_full``: OpenTelemetry's queue) and
    # in the drop ledger (``disk_full``, ``write_failed``, ``unencodable``: running totals of
    # the spool, kept across restarts).
    dropped_in_writers: dict[str, int] = field(default_factory=dict)
    # Span records in bytes the shipper could not read: corrupt ranges and dead writers'
    # torn tails (counted by the record headers found in them, at least one per range).
    unreadable_spans: int = 0
    # Every span counted as never reaching Langfuse: writers' drops + cap + unreadable.
    lost_spans: int = 0
    # Spans sent again because the outcome of an earlier send was unknown (a timeout).
    resent_spans: int = 0
    # Cursor writes that failed (progress then kept in memory only).
    cursor_write_failures: int = 0


def write_status(spool_dir: Path, stats: ShipperStats, **extra: Any) -> None:
    """Update the status file (in place once it exists); a failure is logged at debug level."""
    status = {**asdict(stats), "pid": os.getpid(), "updated_at": time.time(), **extra}
    data = json.dumps(status).encode("utf-8")
    path = spool_dir / STATUS_FILE
    try:
        if not _overwrite(path, data):
            size = max(STATUS_FILE_SIZE, 2 * len(data))
            tmp = spool_dir / f".{STATUS_FILE}.{os.getpid()}"
            tmp.write_bytes(_padded(data, size))
            os.replace(tmp, path)
    except OSError:
        logger.debug("celery-langfuse: could not write %s", STATUS_FILE, exc_info=True)


def reserve_status(spool_dir: Path) -> None:
    """Create the status file at its fixed size if it is missing (while there is room), so
    that every later update is an overwrite in place; failures are ignored."""
    path = spool_dir / STATUS_FILE
    if path.exists():
        return
    tmp = spool_dir / f".{STATUS_FILE}.{os.getpid()}"
    try:
        tmp.write_bytes(_padded(b"{}", STATUS_FILE_SIZE))
        os.link(tmp, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _overwrite(path: Path, data: bytes) -> bool:
    """Overwrite ``path`` in place with ``data`` padded to its size; False if it cannot hold it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if len(data) >= size:
            return False
        write_all_at(fd, _padded(data, size), 0)
        return True
    finally:
        os.close(fd)


def _padded(data: bytes, size: int) -> bytes:
    return data + b" " * (size - len(data) - 1) + b"\n"


def read_status(spool_dir: Path, tries: int = 3) -> dict[str, Any] | None:
    """The last status a shipper wrote, or None (read again if caught mid-update; no wait:
    remote control answers from here on the worker's consumer loop)."""
    for _ in range(tries):
        try:
            data: dict[str, Any] = json.loads((spool_dir / STATUS_FILE).read_bytes())
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            continue
    return None

"""Real processes for the integration tests: a private redis-server and celery workers.

They come from the repository's one process harness (``harness``, shared with ``make demo``
and the benchmarks): every process is started in its own session (so a test can SIGKILL a
whole worker process group) on a free loopback port, waited on by events it prints or
answers, never by sleeps, and killed at clean-up whatever state it is in. The names below stay
importable from here for the tests.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import harness
from harness import *  # noqa: F403  (every harness name stays importable from here)
from harness import RedisServer

__all__ = [*harness.__all__, "spooled_span_count", "worker_environment"]


def spooled_span_count(spool_dir: Path) -> int:
    """How many span records the spool's segments hold (shipped or not)."""
    from tracing.spool import KIND_SPAN, list_segments, scan_file

    return sum(
        sum(1 for record in scan_file(path).records if record.kind == KIND_SPAN)
        for path, _ in list_segments(spool_dir)
    )


def worker_environment(redis_server: RedisServer, receiver: Any, spool_dir: Path | str,
                       db: int | None = None, **extra: str) -> dict[str, str]:
    """A worker's environment: a Redis db of its own (``db``, else drawn), the receiver's
    keys, the spool directory, a queue of its own; ``extra`` adds or overrides variables."""
    db = 1 + uuid.uuid4().int % 14 if db is None else db
    return {
        "CELERY_BROKER_URL": f"{redis_server.url}/{db}",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/{db}",
        "TEST_QUEUE": f"q-{uuid.uuid4().hex[:8]}",
        "LANGFUSE_PUBLIC_KEY": receiver.public_key,
        "LANGFUSE_SECRET_KEY": receiver.secret_key,
        "LANGFUSE_BASE_URL": receiver.base_url,
        "CELERY_LANGFUSE_SPOOL_DIR": str(spool_dir),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }

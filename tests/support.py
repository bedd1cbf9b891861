"""Real processes for the integration tests: a private redis-server and celery workers.

They come from the repository's one process harness (``harness``, shared with ``make demo``
and the benchmarks): every process is started in its own session (so a test can SIGKILL a
whole worker process group) on a free loopback port, waited on by events it prints or
answers, never by sleeps, and killed at clean-up whatever state it is in. The names below stay
importable from here for the tests.
"""

from __future__ import annotations

from pathlib import Path

import harness
from harness import *  # noqa: F403  (every harness name stays importable from here)

__all__ = [*harness.__all__, "spooled_span_count"]


def spooled_span_count(spool_dir: Path) -> int:
    """How many span records the spool's segments hold (shipped or not)."""
    from tracing.spool import KIND_SPAN, list_segments, scan_file

    return sum(
        sum(1 for record in scan_file(path).records if record.kind == KIND_SPAN)
        for path, _ in list_segments(spool_dir)
    )

"""Implementation 3: ``@observe`` plus ``flush()`` in ``worker_process_shutdown`` (the usual fix).

Celery's pool children leave with ``os._exit``, skipping the SDK's ``atexit`` flush; this
signal is the last place a child can push its buffered spans out.
"""

from __future__ import annotations

from typing import Any

from celery import signals
from langfuse import get_client

from bench.apps._common import make_app
from bench.apps._observed import register_task

app = make_app("bench_observe_shutdown_flush")
llm_task = register_task(app)


@signals.worker_process_shutdown.connect
def flush_langfuse(**_: Any) -> None:
    get_client().flush()

"""Implementation 4: ``@observe`` plus a blocking ``flush()`` at the end of every task.

The "flush per request" pattern: nothing is buffered when a process dies, at the price of a
network round trip to Langfuse inside every task.
"""

from __future__ import annotations

from langfuse import get_client

from bench.apps._common import make_app
from bench.apps._observed import register_task


def _flush() -> None:
    get_client().flush()


app = make_app("bench_observe_flush_each")
llm_task = register_task(app, after=_flush)

"""Implementation 5: this project, ``tracing.instrument(app)`` with the durable spool.

The task observation comes from ``instrument()``'s signal handlers; the task body makes the
same ``@observe`` generation as the SDK apps, which nests under it.
"""

from __future__ import annotations

from typing import Any

import tracing
from bench.apps._common import TASK_NAME, make_app
from bench.apps._observed import call_llm

app = make_app("bench_instrumented")
tracing.instrument(app)


@app.task(name=TASK_NAME)
def llm_task(i: int, work_ms: float = 5.0) -> dict[str, Any]:
    return {"i": i, "text": call_llm(f"prompt {i}", work_ms)}

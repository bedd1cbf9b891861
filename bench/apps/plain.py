"""A task that makes no generation (an email, a webhook, a cache refresh), untraced or traced.

``CELERY_LANGFUSE_BENCH_TRACED=1`` instruments the app; otherwise it is the baseline. Either
way the body is the same: the bench's wait, then a small result.
"""

from __future__ import annotations

import os
from typing import Any

from bench.apps._common import TASK_NAME, fake_llm, make_app

app = make_app("bench_plain")
if os.environ.get("CELERY_LANGFUSE_BENCH_TRACED") == "1":
    import tracing

    tracing.instrument(app)


@app.task(name=TASK_NAME)
def llm_task(i: int, work_ms: float = 5.0) -> dict[str, Any]:
    fake_llm("", work_ms)
    return {"i": i}

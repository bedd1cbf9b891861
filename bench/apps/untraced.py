"""Implementation 1: no Langfuse at all (the baseline)."""

from __future__ import annotations

from typing import Any

from bench.apps._common import TASK_NAME, fake_llm, make_app

app = make_app("bench_untraced")


@app.task(name=TASK_NAME)
def llm_task(i: int, work_ms: float = 5.0) -> dict[str, Any]:
    return {"i": i, "text": fake_llm(f"prompt {i}", work_ms)}

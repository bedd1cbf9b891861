"""The Langfuse SDK used the way its docs show: ``@observe`` on the task and on the LLM call.

Shared by the three ``observe_*`` apps, which differ only in when they call ``flush()``.
The client is the SDK's default (``get_client()`` from ``LANGFUSE_*`` variables, the OTLP
exporter to ``LANGFUSE_BASE_URL``), created lazily in the pool child on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from langfuse import get_client, observe

from bench.apps._common import GENERATION_NAME, MODEL, TASK_NAME, fake_llm, usage


@observe(name=GENERATION_NAME, as_type="generation")
def call_llm(prompt: str, work_ms: float) -> str:
    output = fake_llm(prompt, work_ms)
    get_client().update_current_generation(model=MODEL, usage_details=usage(prompt, output))
    return output


def register_task(app: Celery, after: Callable[[], None] | None = None) -> Any:
    """Register ``bench.llm_task`` on ``app``; ``after`` runs at the end of every call."""

    @app.task(name=TASK_NAME)
    @observe(name=TASK_NAME)
    def llm_task(i: int, work_ms: float = 5.0) -> dict[str, Any]:
        try:
            return {"i": i, "text": call_llm(f"prompt {i}", work_ms)}
        finally:
            if after is not None:
                after()

    return llm_task

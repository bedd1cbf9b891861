"""What every benchmark app shares: the Celery configuration and the fake LLM call."""

from __future__ import annotations

import os
import time

from celery import Celery

TASK_NAME = "bench.llm_task"
GENERATION_NAME = "llm"
MODEL = "bench-model"


def make_app(name: str) -> Celery:
    """A Celery app on the broker/backend the benchmark passes in the environment."""
    app = Celery(
        name,
        broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:1/0"),
        backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:1/1"),
    )
    # Celery's defaults (prefetch 4, early ack) apart from JSON: the same for every app.
    app.conf.update(
        task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    return app


def fake_llm(prompt: str, work_ms: float) -> str:
    """Stand-in for a remote model call: a wait (sleep), not CPU work, like a network call."""
    if work_ms > 0:
        time.sleep(work_ms / 1000.0)
    return prompt.upper()


def usage(prompt: str, output: str) -> dict[str, int]:
    return {"input": len(prompt.split()), "output": len(output.split())}

"""This service's Celery app: broker and backend from the environment, traced into Langfuse.

Run it with ``celery -A worker worker`` (``make worker``). It uses only ``tracing``'s public
API, the way any user's service would.
"""

from __future__ import annotations

import os

from celery import Celery

import tracing

app = Celery(
    "worker",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1"),
    include=["tasks.jobs", "tasks.experiments"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)

tracing.instrument(app)

if os.environ.get("DEMO_BEAT_EVERY"):
    # `make demo` runs `celery -A worker beat` for a moment: a periodic summary, so the demo
    # shows what a beat run's trace looks like (named after its schedule entry, tagged beat).
    app.conf.beat_schedule = {
        "hourly-digest": {
            "task": "tasks.summarize",
            "schedule": float(os.environ["DEMO_BEAT_EVERY"]),
            "kwargs": {"text": "The nightly digest: queues drained, models answered, traces "
                               "kept. Nothing was lost on the way.", "max_sentences": 1},
        },
    }

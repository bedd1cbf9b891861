"""The Celery app the experiment tests run in real workers: an item task and its evaluators.

Late acknowledgement and a short visibility timeout: a message whose worker was SIGKILLed is
delivered again (to the other worker) within seconds, as Redis restores unacknowledged
messages after the visibility timeout.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from langfuse import get_client
from langfuse.experiment import Evaluation

import tracing

app = Celery(
    "experiment_app",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:1/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:1/1"),
)
app.conf.update(
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    broker_transport_options={"visibility_timeout": 4, "unacked_restore_interval": 1,
                              "unacked_restore_throttle": 1},
)

tracing.instrument(app)


@app.task(name="x.answer")
def answer(item: dict[str, Any]) -> dict[str, Any]:
    """Upper-case the item's question through one generation; fail on request."""
    question = item["input"]["question"]
    if question == "fail":
        raise ValueError("asked to fail")
    time.sleep(float(item["input"].get("sleep", 0)))
    with get_client().start_as_current_observation(
        as_type="generation", name="llm", model="test-model", input=question,
    ) as generation:
        text = question.upper()
        generation.update(output=text, usage_details={"input": len(question), "output": 1})
    return {"answer": text}


def exact_match(*, input: Any, output: Any, expected_output: Any, metadata: Any,
                **_: Any) -> Evaluation:
    """1 when the answer is the expected output."""
    return Evaluation(name="exact_match", value=float(output["answer"] == expected_output),
                      comment=f"expected {expected_output!r}")


def length(*, output: Any, **_: Any) -> list[dict[str, Any]]:
    """The answer's length, as a dict (the SDK's other evaluator return shape)."""
    return [{"name": "length", "value": len(output["answer"])}]


def accuracy(*, item_results: Any, **_: Any) -> Evaluation:
    """The run's mean exact_match."""
    values = [e.value for r in item_results for e in r.evaluations if e.name == "exact_match"]
    return Evaluation(name="accuracy", value=sum(values) / max(1, len(values)))

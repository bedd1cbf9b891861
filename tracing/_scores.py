"""Scores from anywhere: attach a score to a task's trace knowing only the task id.

A task's trace id is derived from its root task id (see ``_task_tracing``), so any process
that knows the id can compute it — a web service recording user feedback, say — without a
round trip to the worker or to Langfuse.
"""

from __future__ import annotations

from langfuse import Langfuse, get_client

from tracing._task_tracing import trace_id_for


def score_task(
    task_id: str,
    name: str,
    value: float | str,
    *,
    comment: str | None = None,
    root_id: str | None = None,
    client: Langfuse | None = None,
) -> str:
    """Score the trace of ``task_id`` (pass ``root_id`` for a task inside a canvas).

    Sent with the Langfuse SDK's own score delivery and flushed before returning; returns
    the trace id scored.
    """
    trace_id = trace_id_for(root_id or task_id)
    langfuse = client or get_client()
    if isinstance(value, str):
        langfuse.create_score(trace_id=trace_id, name=name, value=value, comment=comment,
                              data_type="CATEGORICAL")
    else:
        langfuse.create_score(trace_id=trace_id, name=name, value=float(value), comment=comment)
    langfuse.flush()
    return trace_id

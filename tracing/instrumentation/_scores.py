"""Scores from anywhere, never lost: attach a score to a task's trace knowing only the task id.

A task's trace id is derived from its root task id (``_task_span``), so any process that knows
the id can score it — a web service recording user feedback, say — without a round trip to the
worker or to Langfuse.

**Durable at the call, no network on the caller's path.** ``score_task`` validates the score,
builds its ``score-create`` ingestion event (``_score_record``) and appends it to the spool as a
``KIND_SCORE`` record: one local ``write``, tens of microseconds, whatever Langfuse is doing.
The shipper sends it to ``/api/public/ingestion`` under the spans' rules (``_score_sending``):
back off and keep while Langfuse is down, set a rejected score aside alone, never a second
score (every score has an id, so a resend is an upsert).

**Who ships it**: the producer's spool path (``_producer``): in a worker, the worker's
shipper; in any other process (a web app, a script, ``python -m tasks score``) a small shipper
thread started by the first record, a last attempt bounded by
``CELERY_LANGFUSE_SHUTDOWN_TIMEOUT`` at exit, then the hand-off store (the deployment's Redis)
or one log line naming what stays on disk. No Langfuse keys in this process: the score is
still written, one warning names the variables; a shipper with keys sends it later.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from tracing.instrumentation import _producer
from tracing.instrumentation._task_span import root_observation_id_for, trace_id_for
from tracing.spool import KIND_SCORE, encode_frame
from tracing.spool._score_record import encode_event, score_event

__all__ = ["pending_scores", "record_score", "score_task"]


def score_task(
    task_id: str,
    name: str,
    value: float | int | bool | str,
    *,
    comment: str | None = None,
    root_id: str | None = None,
    client: Any = None,
    data_type: str | None = None,
    observation: bool = False,
    observation_id: str | None = None,
    score_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    environment: str | None = None,
    timestamp: datetime | None = None,
    config_id: str | None = None,
) -> str:
    """Score the trace of ``task_id``; durable. Inside a canvas pass ``root_id``: a chain's
    first task id, a group's or chord's group id (``GroupResult.id``).

    ``value``: a number (NUMERIC), a string (CATEGORICAL) or a bool (BOOLEAN); ``data_type``
    says it explicitly (``"BOOLEAN"`` with 0/1). By default the score is on the whole trace;
    ``observation=True`` puts it on the task's own observation, which is known from the id
    only for a tree's root task (its first attempt); for any other observation pass its
    ``observation_id``. ``score_id``: your id for the score; by default one derived from the
    target and ``name``, so scoring the same name on the same target again replaces the value
    (an upsert) and a resend never makes a second score. ``config_id``: a Langfuse score
    config the value is checked against. ``client`` is accepted for compatibility and
    unused: scores no longer go through the SDK.

    Returns the trace id scored, once the score is on local disk (no network call; it never
    waits for Langfuse). Raises ``ValueError`` for a value Langfuse would refuse, and
    ``OSError`` if the spool cannot be written (then the score is not recorded).
    """
    del client
    root = root_id or task_id
    trace_id = trace_id_for(root)
    if observation and observation_id is None:
        if root != task_id:
            raise ValueError(
                f"task {task_id} is not the root of its tree ({root}): its observation id is "
                "not derived from the task id; pass observation_id=..., or score the trace"
            )
        observation_id = root_observation_id_for(root)
    record_score(
        trace_id=trace_id, name=name, value=value, observation_id=observation_id,
        data_type=data_type, comment=comment, score_id=score_id, environment=environment,
        metadata=metadata, timestamp=timestamp, config_id=config_id,
    )
    return trace_id


def record_score(**fields: Any) -> None:
    """Build one score event (``score_event``'s keywords) and append it to the spool: the
    durable path every score takes. A trace score follows its trace's sampling decision; a
    run-level score (``dataset_run_id``) is always kept."""
    config = _producer.current_config()
    if not config.enabled:
        return
    fields["environment"] = fields.get("environment") or config.environment
    event = score_event(**fields)
    trace_id = fields.get("trace_id")
    if trace_id and not _producer.sampled(config, trace_id):
        return
    _producer.write(config, encode_frame(KIND_SCORE, encode_event(event)))


def pending_scores(spool_dir: Any) -> int:
    """Score records on the spool past their segment's cursor (scans the unshipped bytes)."""
    from tracing.shipping._reader import count_pending

    return count_pending(Path(spool_dir)).scores

"""Which execution of a task message this is: a message that runs again is a new attempt.

The same message (same task id, same ``retries``) can run more than once: with ``acks_late``
after its pool child or its whole worker died (``task_reject_on_worker_lost``, or the broker's
visibility timeout), after the task raised ``Reject(requeue=True)``, when a producer resends a
task id, or when a task is applied eagerly again. Every execution is its own observation, with
an observation id of its own (``_task_span``'s placement), and one after the first carries
``redelivered: true`` and ``execution: n`` in its metadata.

Who knows that an execution is not the first:

==========================  ==================================================================
the broker                  ``delivery_info["redelivered"]`` (Redis and AMQP set it on a
                            requeued or restored message). It does not say whether the earlier
                            delivery ever *started*: a prefetched message of a SIGKILLed
                            worker comes back flagged without having run. Alone it marks the
                            metadata (``redelivered: true``) but does not move the attempt.
the worker's main process   on ``task_received``, for a message the broker flags or that this
                            process has received before: the spool's open-attempt records
                            (``AttemptIndex.executions``) count the executions of that message
                            that started on this spool (this worker, a restarted worker on the
                            same spool, workers sharing the volume). It hands the number to the
                            pool child in the request's ``delivery_info`` under
                            ``celery_langfuse_execution`` (one of Celery's own request fields,
                            so the task's ``request.headers`` are untouched).
the process running it      executions of the same message it started itself (an eager
                            re-apply, a solo or threads pool, the same pool child).
==========================  ==================================================================

The execution number is the largest of these. A redelivery whose earlier execution ran on a
worker with another spool (another host) and that this worker never saw is not recognised: it
is placed as a first execution (see ``docs/trace-model.md``).
"""

from __future__ import annotations

from typing import Any

from tracing.instrumentation import _runtime
from tracing.instrumentation._task_common import never_raises

EXECUTION_KEY = "celery_langfuse_execution"
_MEMORY = 10_000

# Messages (task id, retries) this main process received, and those this process started
# (plain dicts keep insertion order: the oldest entries go first).
_received: dict[tuple[str, int], None] = {}
_started: dict[tuple[str, int], int] = {}


@never_raises
def on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Main process: tell the pool child which execution of its message it runs, when this
    is not the first one the spool has seen start."""
    runtime = _runtime.current()
    task_id = getattr(request, "id", None)
    delivery = getattr(request, "delivery_info", None)
    if runtime is None or not task_id or not isinstance(delivery, dict):
        return
    request_dict = getattr(request, "request_dict", None) or {}
    key = (task_id, request_dict.get("retries") or 0)
    seen = key in _received
    _remember(_received, key, None)
    if not (seen or delivery.get("redelivered")) or runtime.shipper is None:
        return
    earlier = runtime.shipper.index.executions(key[0], key[1])
    if earlier:
        delivery[EXECUTION_KEY] = earlier + 1


def execution_of(task_id: str, request: Any) -> tuple[int, bool]:
    """Which execution of its message the attempt starting now is, and whether the message
    was redelivered (by the broker, or as far as this worker knows)."""
    delivery = getattr(request, "delivery_info", None) or {}
    key = (task_id, getattr(request, "retries", 0) or 0)
    execution = _started.get(key, 0) + 1
    _remember(_started, key, execution)
    told = delivery.get(EXECUTION_KEY)
    if told is not None:
        execution = max(execution, _int(told))
    return execution, execution > 1 or bool(delivery.get("redelivered"))


def _remember(memory: dict[Any, Any], key: Any, value: Any) -> None:
    """Keep ``key`` (the oldest entries go first, past ``_MEMORY``)."""
    memory[key] = value
    if len(memory) > _MEMORY:
        del memory[next(iter(memory))]


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0

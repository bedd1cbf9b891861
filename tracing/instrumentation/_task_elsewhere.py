"""Task ends seen only by the worker's main process, or for tasks that never ran here.

A hard time limit or a lost worker kills the child mid-task: its attempt is closed under its
own ids (the open-attempt record, ``_attempts``) with Celery's reason. A task revoked before it
ran, a rejected message and an unknown task name never had an attempt: each gets one complete
observation, placed in its tree like any other task.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from typing import Any

from tracing.instrumentation import _runtime
from tracing.instrumentation._payload import clean_text
from tracing.instrumentation._propagation import read_headers
from tracing.instrumentation._task_common import (
    Outcome,
    describe,
    mark_error,
    never_raises,
    start_span,
)
from tracing.instrumentation._task_span import end_attributes

_LOST = ("TimeLimitExceeded", "WorkerLostError", "Terminated")


def failure_elsewhere(sender: Any, task_id: str, exception: BaseException | None) -> None:
    """A failure for a task this process did not run: its child died (time limit, lost)."""
    if type(exception).__name__ not in _LOST:
        return
    reason = describe(exception)
    if type(exception).__name__ == "TimeLimitExceeded":
        reason = f"hard time limit exceeded ({exception}): the worker killed the task"
    _close_dead_attempt(getattr(sender, "name", "celery.task"), task_id,
                        Outcome("ERROR", reason), "FAILURE")


def _close_dead_attempt(name: str, task_id: str, outcome: Outcome, final_state: str) -> None:
    """Close the attempt a dead child left open, or record the task afresh if none was."""
    runtime = _runtime.current()
    if runtime is None or runtime.config.is_excluded(name):
        return
    shipper = runtime.shipper
    reason = outcome.status_message or final_state.lower()
    if shipper is not None and shipper.close_attempt(
        task_id, reason, level=outcome.level, final_state=final_state
    ):
        return
    emit_observation(name, task_id, None, outcome, final_state)


_emitted: set[str] = set()


def emit_observation(
    name: str, task_id: str, root_id: str | None, outcome: Outcome, final_state: str,
    metadata: Mapping[str, Any] | None = None, carrier: Mapping[str, str] | None = None,
) -> None:
    """A complete observation for a task that never ran here (unknown, rejected, revoked)."""
    runtime = _runtime.current()
    if runtime is None or task_id in _emitted or runtime.config.is_excluded(name):
        return
    _emitted.add(task_id)
    if len(_emitted) > 10_000:
        _emitted.clear()
    span = start_span(
        name, task_id, root_id, 0, carrier or {}, "span", input_text=None,
        metadata={"task_id": task_id, "pid": os.getpid(), **(metadata or {})},
    )
    span.set_attributes(end_attributes(
        None, outcome.level, clean_text(outcome.status_message),
        {**outcome.metadata, "final_state": final_state}))
    mark_error(span, outcome)
    span.end()
    runtime.flush()
    if runtime.shipper is not None:
        runtime.shipper.wake()


@never_raises
def on_task_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, signum: Any = None,
    expired: bool = False, **_: Any,
) -> None:
    task_id: str | None = getattr(request, "id", None)
    if task_id is None:
        return
    name = revoked_task_name(sender, request)
    if expired:
        reason = "revoked: expired before it could run"
    elif terminated:
        reason = f"revoked: terminated by signal {signum}"
    else:
        reason = "revoked before it ran"
    if terminated:
        _close_dead_attempt(name, task_id, Outcome("WARNING", reason), "REVOKED")
        return
    emit_observation(name, task_id, getattr(request, "root_id", None),
                     Outcome("WARNING", reason), "REVOKED",
                     carrier=read_headers(request).carrier)


def revoked_task_name(sender: Any, request: Any) -> str:
    """The name of a revoked task: ``task_revoked``'s sender is the task, and Celery 5.x's
    request is a ``Context`` holding the name in ``.task`` (a ``Request``'s ``.task`` is the
    task object); older requests have ``task_name`` or ``name``."""
    candidates = (getattr(sender, "name", None), getattr(request, "task", None),
                  getattr(request, "task_name", None), getattr(request, "name", None))
    for candidate in candidates:
        name = candidate if isinstance(candidate, str) else getattr(candidate, "name", None)
        if isinstance(name, str) and name:
            return name
    return "celery.unknown"


@never_raises
def on_task_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    task_id, name = headers.get("id"), headers.get("task")
    if not task_id:
        return
    reason = f"rejected: {describe(exc)}" if exc else "rejected: unknown message format"
    emit_observation(name or "celery.unknown", task_id, headers.get("root_id"),
                     Outcome("WARNING", reason), "REJECTED", carrier=_carrier(headers))


@never_raises
def on_task_unknown(
    sender: Any = None, message: Any = None, exc: Any = None, name: str | None = None,
    id: str | None = None, **_: Any,
) -> None:
    if not id:
        return
    headers = getattr(message, "headers", None) or {}
    reason = (f"unknown task {name!r}: not registered in this worker "
              "(check the task name and the worker's imports)")
    emit_observation(name or "celery.unknown", id, headers.get("root_id"),
                     Outcome("ERROR", reason), "FAILURE", carrier=_carrier(headers))


def _carrier(headers: Mapping[str, Any]) -> dict[str, str]:
    """The W3C carrier of a raw message's headers (either nesting level)."""
    return read_headers(types.SimpleNamespace(headers=headers)).carrier

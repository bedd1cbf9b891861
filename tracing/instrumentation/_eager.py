"""Tasks run in the calling process (``task_always_eager``, ``task.apply()``), traced like a
worker run.

Celery sends ``task_prerun`` / ``task_postrun`` for an eager run too, but no message is
published: no ``before_task_publish`` writes the caller's trace context into headers, and a
process that is not a worker has no tracing runtime. So, before the task handlers
(``_task_tracing``) see an eager attempt:

* :func:`on_eager_prerun` builds this process's runtime if there is none (``_producer``:
  the SDK wired to the spool, this process's shipper thread; a last bounded attempt at exit,
  then the hand-off store), and writes into the request's headers what a publish would
  have: the caller's ``traceparent`` (an eager task called inside an observation, or inside
  another eager task, is its child; a member of a canvas hangs under the canvas root of
  ``_canvas``), its trace attributes and the send time. An attempt after an eager retry
  hangs under the attempt before, as a published retry does, and a link of a chain applied
  eagerly under the link before, as a worker run places it.
* then ``_task_tracing`` opens the observation as for any attempt: one per attempt, the
  SDK calls in the body nested under it; a task sent from outside any trace is the
  parentless root of ``trace_id_for(task_id)``;
* :func:`on_eager_postrun`, after the attempt's spans are in the spool, wakes the shipper.

A worker disconnects these handlers at ``worker_init`` (three signal receivers would cost its
every task about 2 µs): there, a ``task.apply()`` inside a task gets its observation from
``_task_tracing`` alone, under its tree's root, in the worker's spool.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace as otel_trace

from tracing import _sdk
from tracing.instrumentation import _producer
from tracing.instrumentation._canvas import eager_chain
from tracing.instrumentation._propagation import PARENT_HEADER, inject
from tracing.instrumentation._task_common import never_raises

__all__ = ["after_eager_postrun", "on_eager_postrun", "on_eager_prerun"]

_last_attempt: dict[str, str] = {}  # eager task id -> traceparent of its latest attempt
_bound: dict[str, list[Any]] = {}  # eager task id -> public-key bindings to undo


def _is_eager(task: Any) -> bool:
    return bool(getattr(getattr(task, "request", None), "is_eager", False))


def _latest_config() -> Any:
    from tracing.instrumentation import _instrument

    return _instrument._config or _producer.current_config()


@never_raises
def on_eager_prerun(sender: Any = None, task_id: str | None = None, task: Any = None,
                    **_: Any) -> None:
    """Before ``_task_tracing``: a runtime, and the headers a publish would have written."""
    if task is None or task_id is None or not _is_eager(task):
        return
    runtime = _producer.eager_runtime(_latest_config())
    if runtime is None:
        return
    request = task.request
    headers = dict(request.headers) if isinstance(request.headers, Mapping) else {}
    parent = headers.pop(PARENT_HEADER, None)
    chain = eager_chain()
    if chain is not None and otel_trace.get_current_span().get_span_context() == chain.context:
        chain.links.add(task_id)  # a link of a chain applied here: under the link before
        parent = chain.previous or parent
    if getattr(request, "retries", 0):
        parent = _last_attempt.get(task_id, parent)
    inject(headers, traceparent=parent)
    request.headers = headers
    # get_client() in the body returns this client even if the process has several (a test
    # suite whose tests each use their own keys), as inside @observe.
    _bound.setdefault(task_id, []).append(_sdk.bind_public_key(runtime.config.public_key or ""))


@never_raises
def on_eager_postrun(sender: Any = None, task_id: str | None = None, task: Any = None,
                     **_: Any) -> None:
    """Before ``_task_tracing`` ends the attempt: remember it, the parent of a retry."""
    if task is None or task_id is None or not _is_eager(task):
        return
    context = otel_trace.get_current_span().get_span_context()
    if context.is_valid:
        _last_attempt[task_id] = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
        chain = eager_chain()
        if chain is not None and task_id in chain.links:
            chain.previous = _last_attempt[task_id]
        while len(_last_attempt) > 1000:
            _last_attempt.pop(next(iter(_last_attempt)))


@never_raises
def after_eager_postrun(sender: Any = None, task_id: str | None = None, task: Any = None,
                        **_: Any) -> None:
    """After the attempt's spans are in the spool: ship them soon."""
    if task is None or task_id is None or not _is_eager(task):
        return
    bound = _bound.get(task_id)
    if bound:
        _sdk.unbind_public_key(bound.pop())
        if not bound:
            del _bound[task_id]
    _producer.wake()

"""``run_experiment``: a Langfuse experiment whose items run as Celery tasks on the workers.

``Langfuse.run_experiment`` (langfuse 5.x) runs a task function over a dataset inside one
process, ``max_concurrency`` at a time, and scores each output with evaluators. Here the task is
a Celery task: each item is sent once, as ``task.apply_async(kwargs={"item": item},
task_id=<derived from the run name and the item>)``, and runs on whichever worker takes it.

* **Each item's task is the root of its own trace** (sent outside any trace context, its own
  root id) and its observation carries the ``langfuse.experiment.*`` attributes the Langfuse
  server reads to link the item to the experiment (``_experiment_items``; carried to the
  worker in a message header, ``_experiment_span``). The task's own generations nest under it.
* **Evaluators run here, in the caller, as results arrive**, with the SDK's signatures; their
  scores take the durable score path (the spool, then the shipper: Langfuse being down delays
  them, never loses them) onto the item's trace and task observation; run evaluators run at the
  end, their scores on the experiment run (``_experiment_results``).
* **Resumable**: the task ids are derived from (run name, item), and the run's progress is kept
  in the result backend (``_experiment_ledger``). Calling again with the same ``run_name``
  after the caller died reuses what finished, waits for what is in flight and sends only the
  rest; items already scored are not scored again.
* **A failed item is a result** (``error`` set), not a crash of the run. A worker lost mid-item
  follows Celery's own acknowledgement rules (with ``task_acks_late`` the message is delivered
  again; without, the task fails with ``WorkerLostError`` when only the pool child died).

The run waits for every item to reach a final state (``SUCCESS``, ``FAILURE``, ``REVOKED``),
polling the result backend with one batched read per round (20 ms, doubling to 0.5 s while
nothing arrives). A task whose message is lost never gets there: stop the call (Ctrl-C) and
call again with the same run name and ``resend_unfinished=True``.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry import context as otel_context

from tracing.experiments._experiment_items import (
    Item,
    Run,
    item_attributes,
    items_of,
    local_experiment_id,
    server_experiment_id,
    task_id_for,
)
from tracing.experiments._experiment_ledger import SCORED, SENT, Ledger
from tracing.experiments._experiment_results import (
    TaskItemResult,
    TaskRunResult,
    evaluate,
    evaluation_from_dict,
    evaluation_to_dict,
    score_evaluations,
)
from tracing.instrumentation._experiment_span import EXPERIMENT_HEADER, encode_header
from tracing.instrumentation._producer import current_config
from tracing.instrumentation._task_span import root_observation_id_for, trace_id_for
from tracing.instrumentation._urls import project_id

__all__ = ["run_experiment"]

logger = logging.getLogger("celery_langfuse")

Progress = Callable[[int, int, TaskItemResult], None]
_FIRST_WAIT, _MAX_WAIT = 0.02, 0.5
STALL_WARNING = 300.0  # seconds without a settled item before the run says so, once


def run_experiment(
    *,
    name: str,
    data: Any,
    task: Any,
    evaluators: Sequence[Callable[..., Any]] = (),
    run_evaluators: Sequence[Callable[..., Any]] = (),
    run_name: str | None = None,
    description: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_concurrency: int = 50,
    app: Any = None,
    on_progress: Progress | None = None,
    resend_unfinished: bool = False,
) -> TaskRunResult:
    """Run an experiment over ``data`` with ``task`` on the Celery workers; see the module doc.

    ``name``, ``data``, ``evaluators``, ``run_evaluators``, ``run_name``, ``description``,
    ``metadata`` and ``max_concurrency`` mean what they mean for ``Langfuse.run_experiment``:
    ``data`` is a list of dicts (``input``, ``expected_output``, ``metadata``), a list of
    Langfuse dataset items, or a dataset (``Langfuse.get_dataset(name)``); ``run_name``
    defaults to ``"<name> - <UTC time>"`` (pass it to be able to resume); ``max_concurrency``
    bounds the items in flight (sent, not finished). ``task``: a Celery task, or the name of
    one (registered in ``app``, else sent by name). ``app``: the Celery app (default: the
    task's, else the current app); it needs a result backend. ``on_progress(done, total,
    item_result)`` is called once per item as it is settled. ``resend_unfinished``: send
    again, under the same task ids, the items a previous call published that have not
    finished (their messages were lost: a worker killed without late acknowledgement).

    Returns a ``TaskRunResult`` (the SDK's ``ExperimentResult``): ``item_results`` in the
    order of ``data``, every item exactly once (failed items with ``error``),
    ``run_evaluations``, ``experiment_id``, ``experiment_url`` and ``format()``.
    """
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"run_experiment(max_concurrency={max_concurrency!r}): expected an "
                         "integer >= 1")
    sender, celery_app = _sender(task, app)
    found = items_of(data)
    run_name = run_name or f"{name} - {_utc_now()}"
    ledger = Ledger(celery_app.backend, run_name, found.dataset_id)
    config = current_config()
    experiment_id = ledger.experiment_id(
        lambda: _new_experiment_id(config, run_name, found.dataset_id))
    run = Run(name, run_name, experiment_id, description, metadata, found.dataset_id,
              found.dataset_version)
    logger.info("celery-langfuse: experiment %r run %r (%s): %d item(s), task %s", name,
                run_name, experiment_id, len(found.items), getattr(sender, "name", sender))
    runner = _Runner(run, found.items, sender, ledger, tuple(evaluators), max_concurrency,
                     on_progress, resend_unfinished)
    item_results = runner.run()
    succeeded = [r for r in item_results if r.error is None]
    run_evaluations = [e for evaluator in run_evaluators
                       for e in evaluate(evaluator, item_results=succeeded)]
    _score_run(ledger, run_evaluations, experiment_id)
    return TaskRunResult(
        name=name, run_name=run_name, description=description,
        item_results=list(item_results), run_evaluations=run_evaluations,
        experiment_id=experiment_id, experiment_url=_experiment_url(config, experiment_id),
    )


def _score_run(ledger: Ledger, evaluations: Sequence[Any], experiment_id: str) -> None:
    """Run-level scores, unless the last call of this run wrote the very same ones."""
    as_dicts = [evaluation_to_dict(e) for e in evaluations]
    if as_dicts == ledger.run_scored():
        return
    if score_evaluations(evaluations, dataset_run_id=experiment_id):
        ledger.mark_run_scored(as_dicts)


def _sender(task: Any, app: Any) -> tuple[Any, Any]:
    """What to call ``apply_async`` on, and the app whose result backend keeps the run."""
    if isinstance(task, str):
        if app is None:
            from celery import current_app

            app = current_app
        sender = app.tasks.get(task) or app.signature(task)
    elif hasattr(task, "apply_async") and getattr(task, "name", None):
        sender, app = task, app or getattr(task, "app", None) or getattr(task, "_app", None)
    else:
        raise TypeError(f"run_experiment(task={task!r}): expected a Celery task or the name "
                        "of one; a plain function runs in-process with Langfuse.run_experiment")
    if app is None:
        from celery import current_app

        app = current_app
    from celery.backends.base import DisabledBackend
    from celery.backends.rpc import RPCBackend

    if isinstance(app.backend, DisabledBackend):
        raise ValueError("run_experiment needs a result backend on the Celery app (the items' "
                         "outputs come back through it): set result_backend / "
                         "CELERY_RESULT_BACKEND")
    if isinstance(app.backend, RPCBackend):
        raise ValueError("run_experiment needs a result backend that stores results (redis, a "
                         "database, ...): rpc:// sends them only to the process that sent the "
                         "task, so a resumed run could never find them")
    if getattr(sender, "ignore_result", False):
        raise ValueError(f"task {sender.name} ignores its result (ignore_result=True): "
                         "run_experiment cannot see its outputs; set ignore_result=False")
    return sender, app


def _utc_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _new_experiment_id(config: Any, run_name: str, dataset_id: str | None) -> str:
    if dataset_id is None:
        return local_experiment_id(run_name, None)
    project = project_id(config, timeout=5.0)
    if project is None:
        logger.warning("celery-langfuse: the Langfuse project id is unknown (%s unreachable?); "
                       "run %r gets an experiment id derived from its name instead of the "
                       "server's", config.base_url, run_name)
        return local_experiment_id(run_name, dataset_id)
    return server_experiment_id(project, dataset_id, run_name)


def _experiment_url(config: Any, experiment_id: str) -> str | None:
    project = project_id(config, timeout=2.0)
    if project is None:
        return None
    baseline = urllib.parse.quote(experiment_id, safe="")
    return f"{config.base_url}/project/{project}/experiments/results?baseline={baseline}"


class _Runner:
    """Sends the items, at most ``limit`` in flight, and settles each as its result arrives."""

    def __init__(self, run: Run, items: Sequence[Item], sender: Any, ledger: Ledger,
                 evaluators: Sequence[Callable[..., Any]], limit: int,
                 on_progress: Progress | None, resend_unfinished: bool = False) -> None:
        self.run_info, self.items, self.sender, self.ledger = run, items, sender, ledger
        self.evaluators, self.limit, self.on_progress = evaluators, limit, on_progress
        self.resend_unfinished = resend_unfinished
        self.task_ids = {item.index: task_id_for(run.run_name, item) for item in items}
        self.index_of = {task_id: index for index, task_id in self.task_ids.items()}
        self.results: dict[int, TaskItemResult] = {}

    def run(self) -> list[TaskItemResult]:
        to_send, in_flight = self._resume()
        wait = _FIRST_WAIT
        progress_at, warned = time.monotonic(), False
        while to_send or in_flight:
            while to_send and len(in_flight) < self.limit:
                item = to_send.popleft()
                self._send(item)
                in_flight[self.task_ids[item.index]] = item
            arrived = self.ledger.results(in_flight)
            for task_id, meta in arrived.items():
                self._settle(self._finished(in_flight.pop(task_id), task_id, meta))
            if arrived:
                wait, progress_at, warned = _FIRST_WAIT, time.monotonic(), False
                continue
            if not warned and time.monotonic() - progress_at > STALL_WARNING:
                warned = True
                logger.warning(
                    "celery-langfuse: run %r: no item settled for %.0f s; %d in flight (e.g. "
                    "task %s). If their messages were lost (a worker killed while fetching "
                    "them), stop and call again with resend_unfinished=True",
                    self.run_info.run_name, STALL_WARNING, len(in_flight), next(iter(in_flight)))
            time.sleep(wait)
            wait = min(wait * 2, _MAX_WAIT)
        return [self.results[item.index] for item in self.items]

    def _resume(self) -> tuple[deque[Item], dict[str, Item]]:
        """What a previous call with this run name left: settle, wait for, or send."""
        ids = list(self.task_ids.values())
        marks, ready = self.ledger.marks(ids), self.ledger.results(ids)
        to_send: deque[Item] = deque()
        in_flight: dict[str, Item] = {}
        reused = 0
        for item in self.items:
            task_id = self.task_ids[item.index]
            mark = marks[task_id]
            if item.input is None:
                self._settle(self._result(item, task_id, "SKIPPED", None, [],
                                          "the item has no input; not sent"))
            elif mark.get("status") == SCORED:
                reused += 1
                self._settle(self._rebuilt(item, task_id, ready.get(task_id), mark))
            elif task_id in ready:
                reused += 1
                self._settle(self._finished(item, task_id, ready[task_id]))
            elif mark.get("status") == SENT and not self.resend_unfinished:
                in_flight[task_id] = item
            else:
                to_send.append(item)
        if reused or in_flight:
            logger.info("celery-langfuse: run %r resumed: %d item(s) finished before, %d in "
                        "flight, %d to send", self.run_info.run_name, reused, len(in_flight),
                        len(to_send))
        return to_send, in_flight

    def _send(self, item: Item) -> None:
        task_id = self.task_ids[item.index]
        attributes, metadata = item_attributes(self.run_info, item, task_id)
        # Outside any trace context: the item's task is the root of a trace of its own.
        token = otel_context.attach(otel_context.Context())
        try:
            self.sender.apply_async(
                kwargs={"item": item.payload}, task_id=task_id, root_id=task_id,
                headers={EXPERIMENT_HEADER: encode_header(attributes, metadata)})
        finally:
            otel_context.detach(token)
        self.ledger.mark_sent(task_id)

    def _finished(self, item: Item, task_id: str, meta: Mapping[str, Any]) -> TaskItemResult:
        """An item whose task reached a final state: evaluated and scored if it succeeded."""
        state = str(meta.get("status"))
        if state != "SUCCESS":
            return self._result(item, task_id, state, None, [], _describe(meta.get("result"),
                                                                           state))
        output = meta.get("result")
        evaluations = [e for evaluator in self.evaluators
                       for e in evaluate(evaluator, input=item.input, output=output,
                                         expected_output=item.expected_output,
                                         metadata=item.metadata)]
        if score_evaluations(evaluations, trace_id=trace_id_for(task_id),
                             observation_id=root_observation_id_for(task_id)):
            self.ledger.mark_scored(task_id, [evaluation_to_dict(e) for e in evaluations])
        return self._result(item, task_id, state, output, evaluations, None)

    def _rebuilt(self, item: Item, task_id: str, meta: Mapping[str, Any] | None,
                 mark: Mapping[str, Any]) -> TaskItemResult:
        """An item a previous call scored: its output from the backend, its evaluations from
        the mark (nothing is evaluated or scored again)."""
        stored = (mark.get("result") or {}).get("evaluations") or []
        evaluations = [evaluation_from_dict(e) for e in stored if isinstance(e, Mapping)]
        output = meta.get("result") if meta else None
        return self._result(item, task_id, "SUCCESS", output, evaluations, None)

    def _result(self, item: Item, task_id: str, state: str, output: Any,
                evaluations: list[Any], error: str | None) -> TaskItemResult:
        return TaskItemResult(item=item.original, output=output, evaluations=evaluations,
                              trace_id=trace_id_for(task_id),
                              experiment_id=self.run_info.experiment_id,
                              task_id=task_id, state=state, error=error)

    def _settle(self, result: TaskItemResult) -> None:
        self.results[self.index_of[result.task_id]] = result
        if self.on_progress is not None:
            try:
                self.on_progress(len(self.results), len(self.items), result)
            except Exception:
                logger.exception("celery-langfuse: the experiment's progress callback failed")


def _describe(error: Any, state: str) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}".rstrip(": ")
    if isinstance(error, Mapping) and error.get("exc_type"):
        return f"{error['exc_type']}: {error.get('exc_message')}"
    return f"{state}: {error}" if error is not None else state

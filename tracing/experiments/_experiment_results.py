"""What an experiment run returns, and how its evaluators' verdicts become durable scores.

The result types are the Langfuse SDK's own (``langfuse.experiment.ExperimentItemResult`` and
``ExperimentResult``, so ``format()``, ``experiment_id`` and run evaluators written for the SDK
work unchanged), extended with what a Celery run adds: each item's task id, final state and
error. Unlike the SDK, a failed item stays in ``item_results`` (``error`` set, no evaluations),
and ``format()`` says how many failed and why.

Evaluators have the SDK's signatures: an item evaluator is called with ``input``, ``output``,
``expected_output`` and ``metadata`` keywords; a run evaluator with ``item_results``. Each
returns an ``Evaluation``, a dict of its fields, or a list of them, or an awaitable of that.
An evaluator that raises is logged and skipped, as in the SDK. Every evaluation becomes a
score through ``record_score`` (the spool, then the shipper): an item's on its trace and its
task's observation, as the SDK scores its task span; a run's on the experiment run
(``datasetRunId`` = the experiment id, as the SDK's ``create_score(dataset_run_id=...)``).
Score ids are derived from the target and the name (``#2``, ``#3`` ... for a name repeated on
one target), so scoring an item again is an upsert in Langfuse, never a second score.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langfuse.experiment import Evaluation, ExperimentItemResult, ExperimentResult

from tracing.instrumentation._scores import record_score
from tracing.spool._score_record import score_id_for

__all__ = ["TaskItemResult", "TaskRunResult", "evaluate", "evaluation_from_dict",
           "evaluation_to_dict", "score_evaluations"]

logger = logging.getLogger("celery_langfuse")


class TaskItemResult(ExperimentItemResult):
    """The SDK's item result plus ``task_id``, ``state`` (Celery's) and ``error`` (text)."""

    def __init__(self, *, task_id: str, state: str, error: str | None = None,
                 **fields: Any) -> None:
        super().__init__(**fields)
        self.task_id = task_id
        self.state = state
        self.error = error


class TaskRunResult(ExperimentResult):
    """The SDK's experiment result; ``failed`` lists the items whose task did not succeed."""

    @property
    def failed(self) -> list[TaskItemResult]:
        return [r for r in self.item_results
                if isinstance(r, TaskItemResult) and r.error is not None]

    def format(self, *, include_item_results: bool = False) -> str:
        """The SDK's summary, then how many items failed and the first reasons."""
        text = super().format(include_item_results=include_item_results)
        failed = self.failed
        if not failed:
            return text
        lines = [f"\n\n{len(failed)} of {len(self.item_results)} items failed:"]
        lines += [f"  • task {r.task_id}: {r.error}" for r in failed[:10]]
        if len(failed) > 10:
            lines.append(f"  … and {len(failed) - 10} more")
        return text + "\n".join(lines)


def name_of(function: Any) -> str:
    return str(getattr(function, "__name__", None) or type(function).__name__)


def evaluate(evaluator: Callable[..., Any], **kwargs: Any) -> list[Evaluation]:
    """Run one evaluator (sync or async) and normalise what it returns; [] if it raised."""
    try:
        result = evaluator(**kwargs)
        if inspect.isawaitable(result):
            result = _wait(result)
        candidates = result if isinstance(result, list) else [result]
        return [Evaluation(**c) if isinstance(c, Mapping) else c
                for c in candidates if isinstance(c, (Mapping, Evaluation))]
    except Exception:
        logger.exception("celery-langfuse: evaluator %s failed; its scores are skipped",
                         name_of(evaluator))
        return []


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _wait(awaitable: Any) -> Any:
    """An async evaluator's result; in a thread of its own if this one runs an event loop
    (a notebook), where ``asyncio.run`` is refused."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(awaitable))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _awaited(awaitable)).result()


def score_evaluations(
    evaluations: Sequence[Evaluation], *, trace_id: str | None = None,
    observation_id: str | None = None, dataset_run_id: str | None = None,
) -> bool:
    """Record each evaluation as a score on its target; False if any could not be written
    to the spool (a bad value is logged and skipped: Langfuse would refuse it too)."""
    written = True
    seen: dict[str, int] = {}
    target = trace_id or f"run:{dataset_run_id}"
    for evaluation in evaluations:
        name = str(evaluation.name or "<unknown>")
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        try:
            record_score(
                trace_id=trace_id, observation_id=observation_id,
                dataset_run_id=dataset_run_id, name=name, value=evaluation.value,
                comment=evaluation.comment, metadata=evaluation.metadata,
                data_type=evaluation.data_type, config_id=evaluation.config_id,
                score_id=score_id_for(target, observation_id, label),
            )
        except ValueError as exc:
            logger.error("celery-langfuse: evaluation %r is not a valid score (%s); skipped",
                         name, exc)
        except OSError:
            logger.exception("celery-langfuse: could not write score %r to the spool", name)
            written = False
    return written


def evaluation_to_dict(evaluation: Evaluation) -> dict[str, Any]:
    """An evaluation as JSON (the ledger's form); values JSON cannot hold become text."""
    data = {"name": evaluation.name, "value": evaluation.value, "comment": evaluation.comment,
            "metadata": evaluation.metadata, "data_type": evaluation.data_type,
            "config_id": evaluation.config_id}
    safe: dict[str, Any] = json.loads(json.dumps(data, default=str))
    return safe


def evaluation_from_dict(data: Mapping[str, Any]) -> Evaluation:
    fields = ("name", "value", "comment", "metadata", "data_type", "config_id")
    return Evaluation(**{k: data.get(k) for k in fields})  # type: ignore[arg-type]

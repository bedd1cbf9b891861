"""Where a run's progress is kept: the Celery app's result backend, next to the task results.

A caller that dies mid-run leaves its items' tasks queued, running or done; the next call with
the same run name must find them instead of sending them again. Everything it needs is in the
result backend (the caller's memory died with it), under ids of their own beside the items'
task results, with the backend's own expiry (``result_expires``):

==========================================  ====================  ============================
id (as a Celery task id)                    state                 result
==========================================  ====================  ============================
``celery-langfuse-experiment-run:<hash>``    ``SUCCESS``           ``{"experiment_id": "..."}``
                                                                   the run's experiment id,
                                                                   written once by the first call
``celery-langfuse-experiment-item:<task>``   ``RECEIVED``          ``{"sent_at": <epoch s>}``:
                                                                   the task was published
                                             ``SUCCESS``           ``{"evaluations": [...]}``:
                                                                   its scores are on the spool
``celery-langfuse-experiment-scored:<hash>`` ``STARTED``           ``{"evaluations": [...]}``:
                                                                   the run-level scores last
                                                                   written (overwritable)
==========================================  ====================  ============================

``<hash>`` is 32 hex digits of sha256 over the run name and dataset id; ``<task>`` the item's
task id. An evaluation is ``{"name", "value", "comment", "metadata", "data_type",
"config_id"}``. The "sent" mark is written right *after* the publish returns, so a mark never
names a task that was not sent; the window between the two (microseconds) is the only place
where a killed caller makes the next call send an item a second time.

How an item is found by the next call, from its task's result and its mark:

* mark ``SUCCESS`` -- done and scored: its result is rebuilt, nothing is sent or scored again;
* task result ready (``SUCCESS`` / ``FAILURE`` / ``REVOKED``) -- done, not scored: the
  evaluators run and score it now;
* mark ``RECEIVED`` -- in flight (queued or running): waited for, not sent again;
* nothing -- sent now.

Reads go to the backend in batches (``mget`` for key-value backends, one read a task
otherwise) and never through the backend's result cache, which would hand back a stale mark.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Ledger"]

_RUN_PREFIX = "celery-langfuse-experiment-run:"
_ITEM_PREFIX = "celery-langfuse-experiment-item:"
_RUN_SCORED_PREFIX = "celery-langfuse-experiment-scored:"
SENT = "RECEIVED"
SCORED = "SUCCESS"
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_BATCH = 500


class Ledger:
    """Reads and writes a run's marks in ``backend`` (a Celery result backend)."""

    def __init__(self, backend: Any, run_name: str, dataset_id: str | None) -> None:
        self.backend = backend
        seed = f"{run_name}\x00{dataset_id or ''}"
        digest = hashlib.sha256(seed.encode()).hexdigest()[:32]
        self.run_id = _RUN_PREFIX + digest
        self.run_scored_id = _RUN_SCORED_PREFIX + digest

    def experiment_id(self, make: Any) -> str:
        """The run's experiment id: the one the first call stored, else ``make()`` stored."""
        stored = self.meta([self.run_id])[self.run_id]
        result = stored.get("result")
        if stored.get("status") == SCORED and isinstance(result, Mapping):
            found = result.get("experiment_id")
            if isinstance(found, str) and found:
                return found
        experiment_id = str(make())
        self.backend.store_result(self.run_id, {"experiment_id": experiment_id}, SCORED)
        # Two first calls at once: the backend keeps the first SUCCESS; read back what won.
        again = self.meta([self.run_id])[self.run_id].get("result")
        if isinstance(again, Mapping) and isinstance(again.get("experiment_id"), str):
            return str(again["experiment_id"])
        return experiment_id

    def mark_sent(self, task_id: str) -> None:
        self.backend.store_result(_ITEM_PREFIX + task_id, {"sent_at": time.time()}, SENT)

    def mark_scored(self, task_id: str, evaluations: Sequence[Mapping[str, Any]]) -> None:
        self.backend.store_result(_ITEM_PREFIX + task_id, {"evaluations": list(evaluations)},
                                  SCORED)

    def run_scored(self) -> list[Any] | None:
        """The run-level evaluations whose scores were last written, or None."""
        result = self.meta([self.run_scored_id])[self.run_scored_id].get("result")
        found = result.get("evaluations") if isinstance(result, Mapping) else None
        return list(found) if isinstance(found, list) else None

    def mark_run_scored(self, evaluations: Sequence[Mapping[str, Any]]) -> None:
        # Not SUCCESS: a result backend ignores any later write over a SUCCESS.
        self.backend.store_result(self.run_scored_id, {"evaluations": list(evaluations)},
                                  "STARTED")

    def marks(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each task id's mark: ``{"status": ..., "result": ...}`` (``PENDING``: none)."""
        ids = list(task_ids)
        metas = self.meta([_ITEM_PREFIX + t for t in ids])
        return {t: metas[_ITEM_PREFIX + t] for t in ids}

    def results(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored results of the tasks that are ready (the others are left out)."""
        metas = self.meta(list(task_ids))
        return {t: m for t, m in metas.items() if m.get("status") in READY}

    def meta(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The backend's meta of each id, read past its cache; ``PENDING`` when absent."""
        out: dict[str, dict[str, Any]] = {}
        batched = hasattr(self.backend, "mget") and hasattr(self.backend, "get_key_for_task")
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start:start + _BATCH]
            if batched:
                values = self.backend.mget([self.backend.get_key_for_task(i) for i in chunk])
                for task_id, value in zip(chunk, values, strict=True):
                    out[task_id] = (self.backend.decode_result(value) if value
                                    else {"status": "PENDING", "result": None})
            else:
                for task_id in chunk:
                    out[task_id] = self.backend.get_task_meta(task_id, cache=False)
        return out

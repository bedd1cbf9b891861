"""The items of an experiment run: what each item's task is sent, under which ids.

Pure functions over the caller's ``data`` (no I/O):

* ``items_of(data)`` accepts what ``Langfuse.run_experiment`` accepts -- a list of dicts
  (``input``, ``expected_output``, ``metadata``), a list of the SDK's ``DatasetItem`` -- and a
  Langfuse dataset itself (the SDK's ``DatasetClient``, from ``Langfuse.get_dataset``).
* **The task id** of an item is derived from the run name and the item's key (its dataset item
  id, else its index in ``data``): a second call with the same ``run_name`` computes the same
  ids, which is what makes a run resumable. The task's trace id and root observation id follow
  from the task id (``trace_id_for`` / ``root_observation_id_for``).
* **The experiment id**: for a dataset run, the Langfuse server's own derivation (the SDK's
  ``_create_experiment_id``: sha256 of the JSON array ``["langfuse-experiment-v1", project id,
  dataset id, run name]``, first 16 hex digits), so a run lands in the experiment the server
  expects; without a project id, or for local data, 16 hex digits derived from the run name
  (the SDK draws a random one there, which no resumed run could find again).
* **The attributes** each item's observation carries are the ones the SDK sets on its
  ``experiment-item-task`` span (``Langfuse._process_experiment_item``, langfuse 5.x), by the
  names the Langfuse server extracts (v4.16 ``packages/shared/src/server/otel/attributes.ts``,
  read in ``OtelIngestionProcessor.extractExperimentFields``); values serialised as the SDK's
  ``_serialize`` does (a string as is, anything else as JSON).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tracing import _sdk
from tracing.instrumentation._task_span import root_observation_id_for

__all__ = ["EXPERIMENT_ENVIRONMENT", "Item", "Items", "Run", "item_attributes", "item_id_of",
           "items_of", "local_experiment_id", "serialize", "server_experiment_id", "task_id_for"]

EXPERIMENT_ENVIRONMENT = "sdk-experiment"  # the SDK's LANGFUSE_SDK_EXPERIMENT_ENVIRONMENT


@dataclass(frozen=True)
class Item:
    """One item of the run: the caller's original, and what its task is sent."""

    index: int
    original: Any  # the dict or DatasetItem the caller gave (ExperimentItemResult.item)
    payload: dict[str, Any]  # the task's single keyword argument ``item``
    dataset_item_id: str | None
    dataset_id: str | None

    @property
    def input(self) -> Any:
        return self.payload.get("input")

    @property
    def expected_output(self) -> Any:
        return self.payload.get("expected_output")

    @property
    def metadata(self) -> Any:
        return self.payload.get("metadata")

    @property
    def key(self) -> str:
        """What identifies the item across calls: its dataset item id, else its index."""
        if self.dataset_item_id:
            return f"dataset-item:{self.dataset_item_id}"
        return f"index:{self.index}"


@dataclass(frozen=True)
class Items:
    """The run's items and the dataset they come from (if any)."""

    items: tuple[Item, ...]
    dataset_id: str | None
    dataset_version: datetime | None


def items_of(data: Any) -> Items:
    """The items of ``data`` (a list of dicts or DatasetItems, or a DatasetClient).

    ``TypeError`` naming the position of an item that is neither a dict nor a dataset item.
    """
    version = None
    if hasattr(data, "items") and not isinstance(data, (Mapping, Sequence)):  # a DatasetClient
        version, data = getattr(data, "version", None), list(data.items)
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
        raise TypeError("run_experiment(data=...): expected a list of dicts (input, "
                        "expected_output, metadata), a list of dataset items, or a dataset "
                        f"from Langfuse.get_dataset(); got {type(data).__name__}")
    items = tuple(_item(index, original) for index, original in enumerate(data))
    dataset_id = next((i.dataset_id for i in items if i.dataset_id), None)
    return Items(items, dataset_id, version if isinstance(version, datetime) else None)


def _item(index: int, original: Any) -> Item:
    if isinstance(original, Mapping):
        payload = {"input": original.get("input"),
                   "expected_output": original.get("expected_output"),
                   "metadata": original.get("metadata")}
        return Item(index, original, _json_safe(payload), None, None)
    if hasattr(original, "input") and hasattr(original, "id"):
        dataset_id = getattr(original, "dataset_id", None)
        payload = {"id": str(original.id), "dataset_id": dataset_id, "input": original.input,
                   "expected_output": getattr(original, "expected_output", None),
                   "metadata": getattr(original, "metadata", None)}
        return Item(index, original, _json_safe(payload), str(original.id),
                    str(dataset_id) if dataset_id else None)
    raise TypeError(f"run_experiment(data=...): item {index} is a {type(original).__name__}; "
                    "expected a dict with 'input' (and 'expected_output', 'metadata') or a "
                    "Langfuse dataset item")


def _json_safe(value: Any) -> dict[str, Any]:
    """The payload as JSON would carry it (a task message is JSON): datetimes as ISO text."""
    safe: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return safe


def task_id_for(run_name: str, item: Item) -> str:
    """The item's task id in this run: a UUID derived from the run name and the item's key."""
    digest = hashlib.sha256(f"celery-langfuse:experiment:{run_name}:{item.key}".encode())
    return str(uuid.UUID(bytes=digest.digest()[:16], version=4))


def server_experiment_id(project_id: str, dataset_id: str, run_name: str) -> str:
    """The Langfuse server's experiment id of a dataset run (as the SDK derives it)."""
    payload = json.dumps(["langfuse-experiment-v1", project_id, dataset_id, run_name],
                         separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def local_experiment_id(run_name: str, dataset_id: str | None) -> str:
    """An experiment id derived from the run name (local data, or no project id known)."""
    seed = json.dumps(["celery-langfuse-experiment-v1", dataset_id or "", run_name],
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(seed.encode("utf-8")).hexdigest()[:16]


def serialize(value: Any) -> str | None:
    """The SDK's ``_serialize``: None stays None, a string as is, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def item_id_of(item: Item) -> str:
    """The experiment item id: the dataset item id, else 16 hex digits of sha256 over the
    serialised input (the SDK's rule, so the same local data gets the same item ids)."""
    if item.dataset_item_id:
        return item.dataset_item_id
    return hashlib.sha256((serialize(item.input) or "").encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """What every item of the run shares."""

    name: str
    run_name: str
    experiment_id: str
    description: str | None
    metadata: Mapping[str, Any] | None
    dataset_id: str | None
    dataset_version: datetime | None


def item_attributes(run: Run, item: Item, task_id: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The span attributes and observation metadata of the item's task observation."""
    names = _sdk.attribute_names()
    item_metadata = item.metadata if isinstance(item.metadata, Mapping) else None
    candidates: dict[str, str | None] = {
        names.ENVIRONMENT: EXPERIMENT_ENVIRONMENT,
        names.EXPERIMENT_ID: run.experiment_id,
        names.EXPERIMENT_NAME: run.run_name,
        names.EXPERIMENT_DESCRIPTION: run.description,
        names.EXPERIMENT_METADATA: serialize(dict(run.metadata)) if run.metadata else None,
        names.EXPERIMENT_DATASET_ID: item.dataset_id,
        names.EXPERIMENT_ITEM_ID: item_id_of(item),
        names.EXPERIMENT_ITEM_VERSION: (_utc_text(run.dataset_version)
                                        if item.dataset_id and run.dataset_version else None),
        names.EXPERIMENT_ITEM_EXPECTED_OUTPUT: serialize(item.expected_output),
        names.EXPERIMENT_ITEM_METADATA: serialize(dict(item_metadata)) if item_metadata else None,
        names.EXPERIMENT_ITEM_ROOT_OBSERVATION_ID: root_observation_id_for(task_id),
    }
    attributes = {k: v for k, v in candidates.items() if v is not None}
    run_keys: dict[str, Any] = {"experiment_name": run.name, "experiment_run_name": run.run_name}
    if item.dataset_id:
        run_keys.update(dataset_id=item.dataset_id, dataset_item_id=item.dataset_item_id)
    # As the SDK: the run's keys win over the item's and the experiment's metadata.
    metadata = {**(item_metadata or {}), **(run.metadata or {}), **run_keys}
    return attributes, metadata


def _utc_text(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")

"""Experiments as the Langfuse server reads them from spans: fields, items, runs.

Mirrors langfuse/langfuse 4.16.0 (commit 6275144):

* the attribute names -- ``packages/shared/src/server/otel/attributes.ts``
  (``LangfuseOtelSpanAttributes.EXPERIMENT_*``);
* the extraction -- ``OtelIngestionProcessor.extractExperimentFields`` in
  ``packages/shared/src/server/otel/OtelIngestionProcessor.ts``: every span is read on its
  own; a field is kept when non-empty; ``langfuse.experiment.metadata`` and
  ``langfuse.experiment.item.metadata`` are a JSON object in the attribute itself
  (``parseMetadataAttribute``; a non-object or unparsable value counts as empty) merged with
  ``<prefix>.<key>`` attributes (``extractPrefixedMetadataAttributes``); the item version
  must be a timestamp (``parseExperimentItemVersion``), else it is dropped;
* the items -- ``web/src/features/experiments/server/public/repository.ts`` and
  ``packages/shared/src/server/repositories/experiments.ts``: an experiment item is a span
  with a non-empty experiment id and item id whose span id equals its
  ``experiment_item_root_span_id`` (``e.experiment_item_root_span_id = e.span_id``); an
  experiment's ``item_count`` counts those span ids once each (``uniqIf``).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from ._model import Observation

__all__ = ["ExperimentFields", "experiment_fields"]

_ID = "langfuse.experiment.id"
_NAME = "langfuse.experiment.name"
_DESCRIPTION = "langfuse.experiment.description"
_METADATA = "langfuse.experiment.metadata"
_DATASET_ID = "langfuse.experiment.dataset.id"
_ITEM_ID = "langfuse.experiment.item.id"
_ITEM_VERSION = "langfuse.experiment.item.version"
_ITEM_METADATA = "langfuse.experiment.item.metadata"
_ITEM_ROOT = "langfuse.experiment.item.root_observation_id"
_ITEM_EXPECTED = "langfuse.experiment.item.expected_output"


@dataclasses.dataclass(frozen=True)
class ExperimentFields:
    """The experiment columns Langfuse stores for one span (None/{} when absent)."""

    experiment_id: str | None
    name: str | None
    description: str | None
    dataset_id: str | None
    item_id: str | None
    item_version: str | None
    item_root_span_id: str | None
    item_expected_output: str | None
    metadata: dict[str, Any]
    item_metadata: dict[str, Any]

    def is_item_root(self, span_id: str) -> bool:
        """Whether the span is its experiment item's root (what the server lists as items)."""
        return bool(self.experiment_id and self.item_id and self.item_root_span_id == span_id)


def experiment_fields(observation: Observation) -> ExperimentFields | None:
    """The experiment fields of a received span, or None when it carries none."""
    attributes = observation.attributes
    fields = ExperimentFields(
        experiment_id=_text(attributes.get(_ID)),
        name=_text(attributes.get(_NAME)),
        description=_text(attributes.get(_DESCRIPTION)),
        dataset_id=_text(attributes.get(_DATASET_ID)),
        item_id=_text(attributes.get(_ITEM_ID)),
        item_version=_version(attributes.get(_ITEM_VERSION)),
        item_root_span_id=_text(attributes.get(_ITEM_ROOT)),
        item_expected_output=_text(attributes.get(_ITEM_EXPECTED)),
        metadata=_metadata(attributes, _METADATA),
        item_metadata=_metadata(attributes, _ITEM_METADATA),
    )
    empty = ExperimentFields(None, None, None, None, None, None, None, None, {}, {})
    return None if fields == empty else fields


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _version(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).isoformat()
    except ValueError:
        return None  # "v1", "latest": not a dataset item version; the server drops it


def _metadata(attributes: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    raw = attributes.get(prefix)
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            out.update(parsed if isinstance(parsed, dict)
                       else {str(i): v for i, v in enumerate(parsed)})
    for key, value in attributes.items():
        if key.startswith(prefix + ".") and len(key) > len(prefix) + 1:
            out[key[len(prefix) + 1:]] = value
    return out


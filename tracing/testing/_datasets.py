"""The dataset endpoints ``Langfuse.get_dataset`` calls, and the receiver's experiment queries.

The SDK (langfuse 5.x, ``Langfuse.get_dataset``) calls two routes; they answer as
langfuse/langfuse 4.16.0 (commit 6275144) does:

* ``GET /api/public/v2/datasets/{datasetName}`` --
  ``web/src/pages/api/public/v2/datasets/[datasetName]/index.ts``: the dataset
  (``transformDbDatasetToAPIDataset``: id, projectId, name, description, metadata,
  inputSchema, expectedOutputSchema, createdAt, updatedAt), 404 ``Dataset not found``.
* ``GET /api/public/dataset-items?datasetName=&page=&limit=`` --
  ``web/src/pages/api/public/dataset-items/index.ts`` → ``listDatasetItemsForApi`` in
  ``web/src/features/datasets/server/publicDatasetService.ts``: the ACTIVE items of the
  dataset, page (from 1, default 1) and limit (default 50), ``{"data": [...], "meta": {page,
  limit, totalItems, totalPages}}``; an unknown dataset name is a 404. Item fields as
  ``APIDatasetItem`` in ``web/src/features/public-api/types/datasets.ts``.

Both need Basic auth like every project route (``_routing``). Datasets are put in place by a
test with :meth:`Datasets.add_dataset`, or from another process with ``POST
/_receiver/datasets`` (``{"name": ..., "items": [...]}``).
"""

from __future__ import annotations

import json
import math
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ._experiments import experiment_fields
from ._http import Handler, read_body, send_json
from ._ingestion import Ingestion
from ._model import Observation

__all__ = ["DATASETS_PATH", "DATASET_ITEMS_PATH", "Datasets"]

DATASETS_PATH = "/api/public/v2/datasets/"
DATASET_ITEMS_PATH = "/api/public/dataset-items"
PROJECT_ID = "demo-project"  # what the receiver's /api/public/projects answers


class Datasets(Ingestion):
    """Datasets the receiver serves, and the experiment items it received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datasets: dict[str, dict[str, Any]] = {}
        self._dataset_items: dict[str, list[dict[str, Any]]] = {}

    def add_dataset(
        self, name: str, items: Sequence[Mapping[str, Any]], *, description: str | None = None,
        metadata: Any = None,
    ) -> dict[str, Any]:
        """Create (or replace) a dataset with ``items`` (dicts: ``input``, optional
        ``expected_output``, ``metadata``, ``id``, ``status``); returns it as the API does."""
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        dataset = {"id": f"ds-{uuid.uuid4().hex[:12]}", "projectId": PROJECT_ID, "name": name,
                   "description": description, "metadata": metadata, "inputSchema": None,
                   "expectedOutputSchema": None, "createdAt": now, "updatedAt": now}
        rows = [{"datasetName": name, "id": str(item.get("id") or uuid.uuid4()),
                 "status": item.get("status", "ACTIVE"), "input": item.get("input"),
                 "expectedOutput": item.get("expected_output"),
                 "metadata": item.get("metadata"), "sourceTraceId": None,
                 "sourceObservationId": None, "datasetId": dataset["id"], "createdAt": now,
                 "updatedAt": now, "mediaReferences": []} for item in items]
        with self._cond:
            self._datasets[name] = dataset
            self._dataset_items[name] = rows
        return dict(dataset)

    def experiment_items(self, experiment_id: str | None = None) -> list[Observation]:
        """The experiment items received, as the server lists them (see ``_experiments``):
        spans whose id is their item's root span id, one per span id; of one run if given."""
        items: dict[str, Observation] = {}
        for observation in self.observations:
            fields = experiment_fields(observation)
            if fields is None or not fields.is_item_root(observation.id):
                continue
            if experiment_id is None or fields.experiment_id == experiment_id:
                items[observation.id] = observation
        return list(items.values())

    def _handle_control(self, handler: Handler, method: str, path: str) -> None:
        """``POST /_receiver/datasets`` with ``{"name", "items", "description"?}`` creates a
        dataset (for a receiver in another process: ``python -m tracing.testing``)."""
        if not (method == "POST" and path == "/_receiver/datasets"):
            super()._handle_control(handler, method, path)
            return
        body, _ = read_body(handler, None)
        try:
            document = json.loads(body or b"null")
            name, items = document["name"], document["items"]
            if not isinstance(name, str) or not isinstance(items, list):
                raise TypeError("name must be a string and items a list")
        except (ValueError, KeyError, TypeError) as exc:
            send_json(handler, 400, {"message": f"expected {{name, items}}: {exc}"})
            return
        send_json(handler, 200, self.add_dataset(name, items,
                                                 description=document.get("description")))

    def _handle_datasets(self, handler: Handler, path: str, at: float) -> bool:
        """Answer a dataset route (True), or leave the request to others (False)."""
        if not (path.startswith(DATASETS_PATH) or path == DATASET_ITEMS_PATH):
            return False
        read_body(handler, None)
        if not self._check_auth(handler, "GET", at):
            return True
        if path == DATASET_ITEMS_PATH:
            status, document = self._items_page(handler.path)
        else:
            name = urllib.parse.unquote(path[len(DATASETS_PATH):])
            with self._cond:
                found = self._datasets.get(name)
            status, document = (200, dict(found)) if found else _not_found("Dataset")
        self._record(handler, "GET", status, at=at)
        send_json(handler, status, document)
        return True

    def _items_page(self, raw_path: str) -> tuple[int, dict[str, Any]]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(raw_path).query)
        names_given = query.get("datasetName")
        name = names_given[0] if names_given else None
        try:
            page = int((query.get("page") or ["1"])[0])
            limit = int((query.get("limit") or ["50"])[0])
        except ValueError:
            return 400, {"message": "Invalid request data", "error": "page/limit: Expected number"}
        if page < 1 or limit < 1:
            return 400, {"message": "Invalid request data", "error": "page/limit below 1"}
        with self._cond:
            if name is not None and name not in self._datasets:
                return _not_found("Dataset")
            names = [name] if name is not None else list(self._dataset_items)
            rows = [r for n in names for r in self._dataset_items[n] if r["status"] == "ACTIVE"]
        start = (page - 1) * limit
        meta = {"page": page, "limit": limit, "totalItems": len(rows),
                "totalPages": math.ceil(len(rows) / limit)}
        return 200, {"data": [dict(r) for r in rows[start:start + limit]], "meta": meta}


def _not_found(what: str) -> tuple[int, dict[str, Any]]:
    return 404, {"message": f"{what} not found", "error": "LangfuseNotFoundError"}

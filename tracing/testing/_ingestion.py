"""The JSON endpoints: scores, the batch ingestion API, and the receiver's own control routes.

``POST /api/public/ingestion`` answers as langfuse/langfuse 4.16.0 (commit 6275144) does in
``web/src/pages/api/public/ingestion.ts`` with its default ``LANGFUSE_MIGRATION_V4_WRITE_MODE
=events_only``: a body over Next.js's 4.5 MB ``bodyParser`` limit → 413; bad auth → 401 with
``{"error": "UnauthorizedError", ...}``; no ``batch`` list → 400 ``Invalid request data``;
otherwise 207 with per-event results (``processEventBatch.ts``): ``score-create`` → 201,
an invalid event → 400 ``Invalid request data``, any type but score/sdk-log → 400 ``Event type
not accepted``; ``sdk-log`` events are accepted and answered nowhere.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import uuid
import zlib
from typing import Any

from ._http import Handler, read_body, send, send_json
from ._model import to_json_safe
from ._routing import Routing

__all__ = ["Ingestion"]

INGESTION_BODY_LIMIT = int(4.5 * 1024 * 1024)  # Next.js bodyParser sizeLimit "4.5mb"
_ALLOWED_EVENTS_ONLY = {"score-create", "sdk-log"}


def _event_problem(event: Any) -> str | None:
    """Why the ingestion schema rejects this event (approximated), or None."""
    if not isinstance(event, dict):
        return "Expected object"
    for key in ("id", "timestamp", "type"):
        if not isinstance(event.get(key), str):
            return f"{key}: Required string"
    body = event.get("body")
    if not isinstance(body, dict):
        return "body: Expected object"
    if event["type"] == "score-create" and (
        not isinstance(body.get("name"), str) or "value" not in body
    ):
        return "body: score needs a name and a value"
    return None


class Ingestion(Routing):
    """Handlers for ``/api/public/scores``, ``/api/public/ingestion`` and ``/_receiver/*``."""

    def _read_json(
        self, handler: Handler, at: float, generation: int, limit: int | None = None,
    ) -> tuple[bool, Any]:
        limits = [x for x in (limit, self._max_request_bytes) if x is not None]
        body, too_large = read_body(handler, min(limits) if limits else None)
        self._apply_latency(generation)
        if too_large:
            message = f"Body exceeded {limit or self._max_request_bytes} bytes limit"
            self._record(handler, "POST", 413, at=at, note=message)
            send(handler, 413, message.encode(), "text/plain; charset=utf-8")
            return False, None
        encoding = handler.headers.get("Content-Encoding", "").lower()
        try:
            raw = gzip.decompress(body) if "gzip" in encoding else body
            return True, json.loads(raw or b"null")
        except (ValueError, OSError, EOFError, zlib.error):
            message = "Invalid JSON"
            self._record(handler, "POST", 400, at=at, body_bytes=len(body), note=message)
            send_json(handler, 400, {"message": message})
            return False, None

    def _handle_scores(self, handler: Handler, at: float, generation: int) -> None:
        ok, document = self._read_json(handler, at, generation)
        if not ok or not self._check_auth(handler, "POST", at, scores_allowed=True):
            return
        items = document if isinstance(document, list) else [document]
        if not all(isinstance(item, dict) for item in items):
            message = "Invalid request data"
            self._record(handler, "POST", 400, at=at, note=message)
            send_json(handler, 400, {"message": message, "error": "Expected object"})
            return
        # The v5 SDK batches a list (answered 202 Accepted); one score is answered its id.
        batched = isinstance(document, list)
        status = 202 if batched else 200
        with self._cond:
            self._check_alive(generation)
            self._scores.extend(items)
            self._record(handler, "POST", status, at=at, span_count=len(items))
        if batched:
            send_json(handler, status, {"message": "Accepted"})
        else:
            send_json(handler, status, {"id": document.get("id") or str(uuid.uuid4())})

    def _handle_ingestion(self, handler: Handler, at: float, generation: int) -> None:
        ok, document = self._read_json(handler, at, generation, INGESTION_BODY_LIMIT)
        if not ok or not self._check_auth(handler, "POST", at, named_errors=True):
            return
        batch = document.get("batch") if isinstance(document, dict) else None
        if not isinstance(batch, list):
            self._record(handler, "POST", 400, at=at, note="no batch list")
            send_json(handler, 400, {"message": "Invalid request data",
                                     "errors": ["batch: Expected array"]})
            return
        successes: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        scores: list[dict[str, Any]] = []
        for event in batch:
            kind = event.get("type") if isinstance(event, dict) else None
            event_id = event.get("id") if isinstance(event, dict) else None
            event_id = event_id if isinstance(event_id, str) else "unknown"
            if kind not in _ALLOWED_EVENTS_ONLY:
                rejected.append({"id": event_id, "status": 400,
                                 "message": "Event type not accepted",
                                 "error": f'Event type "{kind or "unknown"}" is not accepted '
                                          "by /api/public/ingestion in events_only mode."})
                continue
            problem = _event_problem(event)
            if problem is not None:
                errors.append({"id": event_id, "status": 400,
                               "message": "Invalid request data", "error": problem})
            elif kind == "score-create":
                successes.append({"id": event_id, "status": 201})
                scores.append(event["body"])
        with self._cond:
            self._check_alive(generation)
            self._ingestion_events.extend(e for e in batch if isinstance(e, dict))
            self._scores.extend(scores)
            self._record(handler, "POST", 207, at=at, span_count=len(batch))
        send_json(handler, 207, {"successes": successes, "errors": errors + rejected})

    def _handle_control(self, handler: Handler, method: str, path: str) -> None:
        read_body(handler, None)
        if method == "GET" and path == "/_receiver/observations":
            send_json(handler, 200, [o.to_dict() for o in self.observations])
        elif method == "GET" and path == "/_receiver/traces":
            send_json(handler, 200, [t.to_dict() for t in self.traces_view().values()])
        elif method == "GET" and path == "/_receiver/tree":
            text = self.format_traces() + "\n"
            send(handler, 200, text.encode(), "text/plain; charset=utf-8")
        elif method == "GET" and path == "/_receiver/requests":
            requests = [to_json_safe(dataclasses.asdict(r)) for r in self.requests]
            send_json(handler, 200, requests)
        elif method == "GET" and path == "/_receiver/scores":
            send_json(handler, 200, self.scores)
        elif method == "GET" and path == "/_receiver/duplicates":
            send_json(handler, 200, self.duplicates())
        elif method == "POST" and path == "/_receiver/clear":
            self.clear()
            send_json(handler, 200, {})
        else:
            send_json(handler, 404, {"message": f"{method} {path}: not found"})

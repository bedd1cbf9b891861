"""The receiver: Langfuse's OTLP route and the dispatch of every request.

``POST /api/public/otel/v1/traces`` answers as ``web/src/pages/api/public/otel/v1/traces/
index.ts`` of langfuse/langfuse 4.16.0 (commit 6275144), in its order: auth (401/403, see
``_routing``), suspension (403), gzip (400 ``Failed to decompress request body``), content
type (400 ``Invalid content type``), parsing (400), no resource spans (200 ``{}``), a span
without ids (400, the whole batch), ``x-langfuse-ingestion-version`` not a number or above 4
(400), else 200 with the queued job. There is no size limit: above 16 MB the server only logs
a warning, and so does the receiver; ``max_request_bytes=`` opts into a proxy's 413 (Langfuse
Cloud's limit is about 5 MB), answered before auth, like a proxy.
"""

from __future__ import annotations

import gzip
import logging
import re
import time
import uuid
import zlib
from typing import Any

from ._datasets import Datasets
from ._decode import BadBatch, decode_observations, iter_spans, parse_otlp, validate_ids
from ._http import Abort, Handler, read_body, send, send_json
from ._state import TRACES_PATH

__all__ = ["LangfuseReceiver"]

logger = logging.getLogger("tracing.testing")

SCORES_PATH = "/api/public/scores"
INGESTION_PATH = "/api/public/ingestion"
HEALTH_PATH = "/api/public/health"
PROJECTS_PATH = "/api/public/projects"
MAX_INGESTION_VERSION = 4
_WARN_BODY_BYTES = 16 * 1024 * 1024


def unsupported_version(value: str | None) -> bool:
    """The route's check: ``parseInt(value, 10)`` is NaN or above 4 (absent is fine)."""
    if not value:
        return False
    match = re.match(r"\s*([+-]?\d+)", value)
    return match is None or int(match.group(1)) > MAX_INGESTION_VERSION


class LangfuseReceiver(Datasets):
    """A loopback HTTP server that accepts what a Langfuse client sends and records it.

    Thread-safe: the server answers each connection on its own thread, and every setter and
    query may be called from any thread at any time. See the package docstring.
    """

    def _dispatch(self, handler: Handler, method: str) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/") or "/"
        at = time.monotonic()
        generation = handler.server.generation
        if path.startswith("/_receiver/"):
            try:
                self._handle_control(handler, method, path)
            except OSError:
                handler.close_connection = True
            return
        with self._cond:
            self._in_flight += 1
            self._cond.notify_all()
        try:
            self._route(handler, method, path, at, generation)
        except Abort:
            handler.close_connection = True
            self._record(handler, method, 0, at=at, note="receiver went down mid-request")
        except OSError as exc:
            handler.close_connection = True
            logger.debug("receiver: connection error on %s %s: %s", method, path, exc)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def _route(self, handler: Handler, method: str, path: str, at: float, gen: int) -> None:
        if method == "POST" and path == TRACES_PATH:
            self._handle_traces(handler, at, gen)
        elif method == "POST" and path == SCORES_PATH:
            self._handle_scores(handler, at, gen)
        elif method == "POST" and path == INGESTION_PATH:
            self._handle_ingestion(handler, at, gen)
        elif method == "GET" and self._handle_datasets(handler, path, at):
            pass
        elif method == "GET" and path == HEALTH_PATH:
            self._record(handler, method, 200, at=at)
            send_json(handler, 200, {"status": "OK", "version": "4.16.0"})
        elif method == "GET" and path == PROJECTS_PATH:
            read_body(handler, None)
            if self._check_auth(handler, method, at):
                project = {"id": "demo-project", "name": "demo", "metadata": {},
                           "organization": {"id": "demo-org", "name": "demo"}}
                self._record(handler, method, 200, at=at)
                send_json(handler, 200, {"data": [project]})
        else:
            read_body(handler, None)
            status = 405 if path in {TRACES_PATH, SCORES_PATH, INGESTION_PATH} else 404
            self._record(handler, method, status, at=at)
            send_json(handler, status, {"message": f"{method} {path}: not found"})

    def _handle_traces(self, handler: Handler, at: float, generation: int) -> None:
        body, too_large = read_body(handler, self._max_request_bytes)
        fields: dict[str, Any] = {"at": at, "body_bytes": len(body)}
        self._apply_latency(generation)
        fault = self._take_fault()
        if fault is not None:
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._record(handler, "POST", fault.status, note="injected failure", **fields)
            send(handler, fault.status, fault.body, fault.content_type, extra)
            return
        if too_large:
            message = f"Request body exceeds the limit of {self._max_request_bytes} bytes"
            self._record(handler, "POST", 413, note="too large", **fields)
            send_json(handler, 413, {"message": message})
            return
        if not self._check_auth(handler, "POST", at, body_bytes=len(body)):
            return
        if "gzip" in handler.headers.get("Content-Encoding", "").lower():
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                self._reject(handler, fields, "Failed to decompress request body")
                return
        try:
            request = parse_otlp(handler.headers.get("Content-Type", "").lower(), body)
        except BadBatch as exc:
            self._reject(handler, fields, str(exc))
            return
        span_ids = [span.span_id.hex() for _, _, span in iter_spans(request)]
        fields.update(span_count=len(span_ids), span_ids=span_ids)
        if not request.resource_spans:
            self._record(handler, "POST", 200, note="no resource spans", **fields)
            send_json(handler, 200, {})
            return
        try:
            validate_ids(request)
        except BadBatch as exc:
            self._reject(handler, fields, str(exc))
            return
        if len(body) > _WARN_BODY_BYTES:
            logger.warning("OTEL request body exceeds 16MB (%d bytes)", len(body))
        version = handler.headers.get("x-langfuse-ingestion-version")
        if unsupported_version(version):
            message = (f'Unsupported x-langfuse-ingestion-version: "{version}". '
                       f'Maximum supported: "{MAX_INGESTION_VERSION}".')
            self._reject(handler, fields, message)
            return
        self._store(handler, request, fields, generation)

    def _store(self, handler: Handler, request: Any, fields: dict[str, Any], gen: int) -> None:
        observations = decode_observations(request, fields["at"])
        with self._cond:
            poison = self._poison
        for obs in observations if poison is not None else ():
            try:
                poisoned = poison(obs.to_dict(json_safe=False))  # type: ignore[misc]
            except Exception as exc:
                message = f"poison predicate raised {type(exc).__name__}: {exc}"
                self._record(handler, "POST", 500, note=message, **fields)
                send_json(handler, 500, {"message": message})
                return
            if poisoned:
                self._reject(handler, fields, f"poisoned span {obs.id} ({obs.name!r})")
                return
        with self._cond:
            self._check_alive(gen)
            self._observations.extend(observations)
            self._id_counts.update(o.id for o in observations)
            self._record(handler, "POST", 200, **fields)  # same lock: seen together
        job_id, now = str(uuid.uuid4()), int(time.time() * 1000)
        send_json(handler, 200, {"id": job_id, "name": "otel-ingestion-job", "timestamp": now})

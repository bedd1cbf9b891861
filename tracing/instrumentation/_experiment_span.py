"""An experiment item's task: the ``langfuse.experiment.*`` attributes its message carries.

``run_experiment`` (``_experiments``) sends each item's task with one extra message header,
``celery_langfuse_experiment``; the worker puts what it holds on the attempt's observation
right after the span starts, before the open attempt is recorded, so an attempt that someone
else closes (worker lost, hard time limit) carries the attributes too, and every attempt of
the item (a retry copies the request's headers) does as well.

**The header (version 1)**: a JSON object::

    {"v": 1,
     "attributes": {"langfuse.experiment.id": "<16 hex>", "langfuse.experiment.name": "...",
                    "langfuse.environment": "sdk-experiment", ...},
     "metadata": {"experiment_name": "...", "experiment_run_name": "...", ...}}

``attributes``: span attributes, string values, each name ``langfuse.environment`` or
starting with ``langfuse.experiment.`` (anything else is ignored: a message cannot set
arbitrary attributes); the sender has serialised them the way the Langfuse SDK does in
``Langfuse._process_experiment_item``. ``metadata``: the observation's metadata keys,
written the way the SDK writes metadata (one attribute per key, JSON). Unknown top-level keys
are ignored. An unreadable header is logged once and ignored: the task runs as usual.

Celery nests custom headers under ``headers["headers"]`` or not depending on the protocol and
the sender, so both levels are read (as ``_propagation`` does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from tracing.instrumentation._task_span import metadata_attributes

__all__ = ["EXPERIMENT_HEADER", "encode_header", "experiment_attributes", "read_header"]

logger = logging.getLogger("celery_langfuse")

EXPERIMENT_HEADER = "celery_langfuse_experiment"
_VERSION = 1
_ALLOWED_PREFIX = "langfuse.experiment."
_ENVIRONMENT = "langfuse.environment"
_warned = False


def encode_header(attributes: Mapping[str, str], metadata: Mapping[str, Any]) -> str:
    """The header value for one item's task (see the module docstring)."""
    return json.dumps({"v": _VERSION, "attributes": dict(attributes),
                       "metadata": dict(metadata)}, default=str, ensure_ascii=False,
                      separators=(",", ":"))


def read_header(request: Any) -> Any:
    """The raw header value of a task request, at either level, or None."""
    for candidate in (getattr(request, "headers", None), getattr(request, "__dict__", None)):
        if not isinstance(candidate, Mapping):
            continue
        for source in (candidate, candidate.get("headers")):
            if isinstance(source, Mapping) and source.get(EXPERIMENT_HEADER) is not None:
                return source[EXPERIMENT_HEADER]
    return None


def experiment_attributes(request: Any) -> dict[str, Any]:
    """The span attributes an experiment item's task observation gets (empty if none)."""
    raw = read_header(request)
    if raw is None:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        if not isinstance(data, Mapping) or not isinstance(data.get("attributes"), Mapping):
            raise ValueError("not a JSON object with an 'attributes' object")
    except ValueError as exc:
        _warn_once(f"celery-langfuse: ignoring an unreadable {EXPERIMENT_HEADER} header "
                   f"({exc}); the task runs without its experiment attributes")
        return {}
    out: dict[str, Any] = {
        str(key): str(value) for key, value in data["attributes"].items()
        if value is not None
        and (str(key).startswith(_ALLOWED_PREFIX) or key == _ENVIRONMENT)
    }
    metadata = data.get("metadata")
    if isinstance(metadata, Mapping):
        out.update(metadata_attributes({str(k): v for k, v in metadata.items()}))
    return out


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(message)

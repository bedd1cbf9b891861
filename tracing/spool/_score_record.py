"""The score record: one Langfuse ``score-create`` ingestion event, built and checked at the call.

Pure functions (no I/O): ``score_event`` validates the caller's values and returns the event the
shipper will send unchanged (``_spool``'s ``KIND_SCORE``); ``event_id_of`` reads its id back.

* **Data types** (Langfuse's ``ScoreBody``): ``NUMERIC`` a finite number, ``CATEGORICAL`` a
  string, ``BOOLEAN`` 0 or 1 (``True``/``False`` are accepted). Inferred from the value when
  not given: ``bool`` → BOOLEAN, ``str`` → CATEGORICAL, a number → NUMERIC. A value Langfuse
  would refuse raises ``ValueError`` here, at the call, instead of dead-lettering later.
* **Ids**: the score id is the caller's ``score_id``, else derived from (trace id, observation
  id, name): scoring the same name on the same target again is an upsert of one score, and a
  resent record is never a second score. The event id is drawn once per call and kept in the
  record, so the per-event results of a 207 answer map to exactly one record.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["DATA_TYPES", "EVENT_TYPE", "encode_event", "event_id_of", "score_event", "score_id_for"]

EVENT_TYPE = "score-create"
DATA_TYPES = ("NUMERIC", "CATEGORICAL", "BOOLEAN")


def score_id_for(trace_id: str, observation_id: str | None, name: str) -> str:
    """The default score id: 32 hex digits of sha256 over the target and the name."""
    seed = f"celery-langfuse:score:{trace_id}:{observation_id or ''}:{name}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def _timestamp(when: datetime | None) -> str:
    when = when or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # naive values are UTC, as the SDK reads them
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _typed_value(value: Any, data_type: str | None) -> tuple[float | str, str]:
    if data_type is not None and data_type not in DATA_TYPES:
        raise ValueError(f"data_type={data_type!r}: expected one of {', '.join(DATA_TYPES)}")
    if data_type is None:
        data_type = ("BOOLEAN" if isinstance(value, bool)
                     else "CATEGORICAL" if isinstance(value, str) else "NUMERIC")
    if data_type == "CATEGORICAL":
        if not isinstance(value, str) or not value:
            raise ValueError(f"a CATEGORICAL score needs a non-empty string value, got {value!r}")
        return value, data_type
    if isinstance(value, str) or not isinstance(value, (int, float)):
        raise ValueError(f"a {data_type} score needs a number, got {value!r}")
    number = float(value)
    if data_type == "BOOLEAN" and number not in (0.0, 1.0):
        raise ValueError(f"a BOOLEAN score is 0 or 1 (or True/False), got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"a NUMERIC score needs a finite number, got {value!r}")
    return number, data_type


def score_event(
    *, trace_id: str | None, name: str, value: Any, observation_id: str | None = None,
    data_type: str | None = None, comment: str | None = None, score_id: str | None = None,
    environment: str | None = None, metadata: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None, dataset_run_id: str | None = None,
    config_id: str | None = None,
) -> dict[str, Any]:
    """The ``score-create`` event for one score (raises ``ValueError`` on a bad value).

    The target is a trace (``trace_id``, and ``observation_id`` for one of its observations)
    or an experiment run (``dataset_run_id``: Langfuse's run-level scores, ``datasetRunId``
    in ``ScoreBody``; its default score id is derived from ``run:<id>`` and the name).
    ``config_id``: a Langfuse score config the value is checked against (``configId``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a score needs a non-empty name, got {name!r}")
    if not trace_id and not dataset_run_id:
        raise ValueError("a score needs a target: a trace id or a dataset run id")
    typed, kind = _typed_value(value, data_type)
    target = trace_id or f"run:{dataset_run_id}"
    body: dict[str, Any] = {"id": score_id or score_id_for(target, observation_id, name)}
    if trace_id:
        body["traceId"] = trace_id
    body.update(name=name, value=typed, dataType=kind)
    if dataset_run_id:
        body["datasetRunId"] = dataset_run_id
    if config_id:
        body["configId"] = str(config_id)
    if observation_id:
        body["observationId"] = observation_id
    if comment is not None:
        body["comment"] = str(comment)
    if environment:
        body["environment"] = environment
    if metadata is not None:
        body["metadata"] = json.loads(json.dumps(dict(metadata), default=str))
    return {"id": secrets.token_hex(16), "type": EVENT_TYPE, "timestamp": _timestamp(timestamp),
            "body": body}


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The record payload: compact UTF-8 JSON."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_id_of(payload: bytes) -> str:
    """The event id of a record payload; ``ValueError`` if it is not a score event."""
    try:
        event = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"score record is not UTF-8 JSON ({exc})") from None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        raise ValueError("score record has no event id")
    return str(event["id"])

"""What the receiver stores: observations, traces and requests, as Langfuse shows them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = ["Observation", "ReceivedRequest", "Trace"]


@dataclasses.dataclass(frozen=True)
class Observation:
    """One accepted span, converted the way Langfuse v4 converts it (see ``_decode``).

    ``parent_observation_id`` is the OTel parent span id; ``is_root`` is Langfuse v4's root
    rule (no parent span id, or ``langfuse.internal.is_app_root``). ``metadata`` is what
    Langfuse shows as the observation's metadata minus the ``resourceAttributes`` / ``scope``
    keys it adds (find those in ``resource_attributes`` and ``scope_name``): the observation
    metadata with the propagated trace metadata merged in, trace keys winning.
    ``trace_metadata`` is the trace-metadata part alone. Times are truncated to milliseconds;
    a span without an end time ends at its start, as Langfuse stores it. ``usage_details``
    and ``cost_details`` are normalised as Langfuse stores them. ``attributes`` keeps every
    raw span attribute, arrays as lists.
    """

    id: str
    trace_id: str
    parent_observation_id: str | None
    name: str
    type: str
    level: str
    status_message: str | None
    input: Any
    output: Any
    metadata: dict[str, Any]
    model: str | None
    model_parameters: dict[str, Any] | None
    usage_details: dict[str, Any]
    cost_details: dict[str, Any]
    completion_start_time: datetime | None
    start_time: datetime
    end_time: datetime | None
    environment: str
    release: str | None
    version: str | None
    user_id: str | None
    session_id: str | None
    tags: list[str]
    trace_name: str | None
    trace_metadata: dict[str, Any]
    is_root: bool
    status_code: int
    kind: int
    scope_name: str
    scope_version: str
    attributes: dict[str, Any]
    resource_attributes: dict[str, Any]
    received_at: float
    is_app_root: bool = False

    @property
    def duration_ms(self) -> float | None:
        """Span duration in milliseconds, or None when the span has no end time."""
        if self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds() * 1000.0

    @property
    def total_tokens(self) -> int | float | None:
        """``usage_details["total"]``, else the sum of the usage values, else None."""
        return total_of(self.usage_details)

    @property
    def total_cost(self) -> int | float | None:
        """``cost_details["total"]``, else the sum of the cost values, else None."""
        return total_of(self.cost_details)

    def to_dict(self, *, json_safe: bool = True) -> dict[str, Any]:
        """The fields as a dict; with ``json_safe`` datetimes become ISO strings."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return to_json_safe(out) if json_safe else out


@dataclasses.dataclass(frozen=True)
class Trace:
    """A trace as Langfuse v4 aggregates it from its observations (see ``_traces``).

    ``name``, ``input``, ``output`` and ``metadata`` are what the Langfuse UI and API show
    for the trace; ``roots`` are the observations Langfuse counts as roots (no parent span
    id, or an app root), in arrival order; ``observations`` holds each span id once (the
    last copy received), by start time.
    """

    id: str
    name: str | None
    input: Any
    output: Any
    metadata: dict[str, Any]
    user_id: str | None
    session_id: str | None
    tags: list[str]
    environment: str | None
    release: str | None
    version: str | None
    timestamp: datetime
    latency_ms: float
    level: str
    total_cost: float | None
    roots: tuple[Observation, ...]
    observations: tuple[Observation, ...]

    @property
    def root(self) -> Observation | None:
        """The root the trace takes its input/output from (the last parentless span)."""
        parentless = [o for o in self.roots if o.parent_observation_id is None]
        return parentless[-1] if parentless else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields; roots and observations as their ids."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["roots"] = [o.id for o in self.roots]
        out["observations"] = [o.id for o in self.observations]
        safe: dict[str, Any] = to_json_safe(out)
        return safe


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request as the receiver saw it and answered it."""

    at: float  # time.monotonic() at arrival
    method: str
    path: str
    status: int
    span_count: int
    span_ids: tuple[str, ...]
    headers: dict[str, str]  # lower-cased names
    body_bytes: int
    note: str = ""


def total_of(values: Mapping[str, Any]) -> int | float | None:
    """``values["total"]``, else the sum of the numeric values, else None."""
    if not values:
        return None
    total = values.get("total")
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        return total
    numbers = [v for v in values.values() if isinstance(v, (int, float))]
    return sum(numbers) if numbers else None


def to_json_safe(value: Any) -> Any:
    """Datetimes as ISO strings, bytes as hex, tuples as lists, recursively."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return value

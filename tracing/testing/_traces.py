"""The trace-level rules: which spans are roots, and where a trace's fields come from.

Mirrors langfuse/langfuse 4.16.0 (commit 6275144), where a v4 trace is not stored but
aggregated from its observations ("events") at query time:

* roots -- ``isRootObservation`` / ``eventsTableIsRootObservationSql`` in
  ``packages/shared/src/eventsTable.ts``: ``parent_span_id = '' OR is_app_root``
  (``langfuse.internal.is_app_root``, read by ``OtelIngestionProcessor.extractIsAppRoot``).
* name -- ``eventsTableTraceNameAggregationSql`` (same file): the last non-empty
  ``langfuse.trace.name`` of ANY observation of the trace, else the name of the root that
  arrived last.
* input, output, metadata -- ``EVENTS_AGGREGATION_FIELDS`` in
  ``packages/shared/src/server/queries/clickhouse-sql/event-query-builder.ts``:
  ``argMaxIf(..., event_ts, parent_span_id = '')`` -- only from the last-arrived span whose
  parent span id is EMPTY (an app root with a parent never gives them; an empty value on
  that span is the trace's value).
* user, session, environment, release, version, tags -- the last non-empty value of any
  observation (tags: the last non-empty list, not a union).
* timestamp = earliest start; latency = latest start-or-end minus it; level = the worst.

"Arrived last" is Langfuse's ``event_ts`` (the time the worker wrote the event); here it is
arrival order at the receiver, a later request after an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._model import Observation, Trace

__all__ = ["build_trace", "is_root"]

_LEVEL_ORDER = ("ERROR", "WARNING", "DEFAULT", "DEBUG")


def is_root(obs: Observation) -> bool:
    """Langfuse v4's root rule: no parent span id, or flagged as an app root."""
    return obs.parent_observation_id is None or obs.is_app_root


def _last(values: Iterable[Any]) -> Any:
    """The last non-empty value (argMaxIf(x, event_ts, x <> ''))."""
    out = None
    for value in values:
        if value not in (None, "", [], {}):
            out = value
    return out


def build_trace(trace_id: str, arrived: list[Observation]) -> Trace:
    """The trace Langfuse v4 shows for these observations, given in arrival order."""
    if not arrived:
        raise ValueError(f"trace {trace_id}: no observations")
    latest: dict[str, Observation] = {}
    for obs in arrived:
        latest.pop(obs.id, None)
        latest[obs.id] = obs  # a resent span id: the last copy wins, in its new place
    events = list(latest.values())
    roots = tuple(o for o in events if is_root(o))
    parentless = [o for o in events if o.parent_observation_id is None]
    source = parentless[-1] if parentless else None
    name = _last(o.trace_name for o in events) or _last(o.name for o in roots)
    start = min(o.start_time for o in events)
    finish = max(max(o.start_time, o.end_time or o.start_time) for o in events)
    costs = [c for c in (o.total_cost for o in events) if c is not None]
    levels = {o.level for o in events}
    return Trace(
        id=trace_id,
        name=name,
        input=None if source is None else source.input,
        output=None if source is None else source.output,
        metadata={} if source is None else dict(source.metadata),
        user_id=_last(o.user_id for o in events),
        session_id=_last(o.session_id for o in events),
        tags=list(_last(o.tags for o in events) or []),
        environment=_last(o.environment for o in events),
        release=_last(o.release for o in events),
        version=_last(o.version for o in events),
        timestamp=start,
        latency_ms=(finish - start).total_seconds() * 1000.0,
        level=next((lv for lv in _LEVEL_ORDER if lv in levels), "DEFAULT"),
        total_cost=float(sum(costs)) if costs else None,
        roots=roots,
        observations=tuple(sorted(events, key=lambda o: o.start_time)),
    )

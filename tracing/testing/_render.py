"""Printable trees: each trace with the name, input and output Langfuse v4 shows for it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ._model import Observation, ReceivedRequest, Trace

__all__ = ["describe", "render_trace", "short", "summarise"]

_SHORT = 100


def short(value: Any, limit: int = _SHORT) -> str:
    """A one-line rendering of an input/output value, cut at ``limit`` characters."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(obs: Observation, copies: int) -> str:
    """One observation's line: name, type, level, duration, model, tokens, cost, message."""
    parts = [f"{obs.name} [{obs.type}] {obs.level}"]
    duration = obs.duration_ms
    parts.append("(open)" if duration is None else f"{duration:.0f} ms")
    wait = obs.metadata.get("queue_wait_ms")
    if isinstance(wait, (int, float)):
        parts.append(f"(waited {wait:.0f} ms in the queue)")
    if obs.model:
        parts.append(f"model={obs.model}")
    usage = obs.usage_details
    if usage:
        shown: list[str] = [k for k in ("input", "output", "total") if k in usage]
        shown = shown or sorted(usage)
        parts.append("tokens " + " ".join(f"{k}={_number(usage[k])}" for k in shown))
    cost = obs.total_cost
    if cost is not None:
        parts.append(f"cost=${cost:.6f}")
    if obs.status_message and obs.level != "DEFAULT":
        parts.append(f'"{short(obs.status_message, 120)}"')  # cut: ends in "…"
    if obs.is_app_root and obs.parent_observation_id is not None:
        parts.append("(app root)")
    if copies > 1:
        parts.append(f"DUPLICATE x{copies}")
    return " ".join(parts)


def render_trace(trace: Trace, duplicates: Mapping[str, int]) -> str:
    """The trace header (as Langfuse v4 shows the trace), then its observations as a tree."""
    info = [f"trace {trace.id}", f"name={trace.name!r}"]
    for label, value in (("user", trace.user_id), ("session", trace.session_id)):
        if value:
            info.append(f"{label}={value}")
    if trace.tags:
        info.append(f"tags={trace.tags}")
    if trace.environment and trace.environment != "default":
        info.append(f"env={trace.environment}")
    if len(trace.roots) > 1:
        info.append(f"({len(trace.roots)} roots)")
    lines = [" ".join(info), f"  input:  {short(trace.input)}", f"  output: {short(trace.output)}"]
    by_id = {o.id: o for o in trace.observations}
    children: dict[str | None, list[Observation]] = {}
    for obs in trace.observations:
        parent = obs.parent_observation_id
        children.setdefault(parent if parent in by_id else None, []).append(obs)

    def walk(obs: Observation, prefix: str, last: bool) -> None:
        label = describe(obs, duplicates.get(obs.id, 1))
        parent = obs.parent_observation_id
        if parent is not None and parent not in by_id and not obs.is_app_root:
            label += f" (parent {parent} not received)"
        lines.append(prefix + ("└─ " if last else "├─ ") + label)
        kids = children.get(obs.id, [])
        for index, child in enumerate(kids):
            walk(child, prefix + ("   " if last else "│  "), index == len(kids) - 1)

    tops = children.get(None, [])
    for index, obs in enumerate(tops):
        walk(obs, "", index == len(tops) - 1)
    return "\n".join(lines)


def summarise(
    observations: Sequence[Observation],
    trace_requests: Sequence[ReceivedRequest],
    duplicates: Mapping[str, int],
    trees: str,
) -> str:
    """Counts, names, request statuses and (at most 80 lines of) trees."""
    names = Counter(o.name for o in observations)
    statuses = Counter(r.status for r in trace_requests)
    lines = [
        f"received {len(observations)} observation(s) "
        f"({len({o.id for o in observations})} distinct) in "
        f"{len({o.trace_id for o in observations})} trace(s)",
        "names: " + (", ".join(f"{k} x{v}" for k, v in names.most_common()) or "(none)"),
        f"trace requests: {sum(statuses.values())} "
        + (
            "(" + ", ".join(f"HTTP {k} x{v}" for k, v in sorted(statuses.items())) + ")"
            if statuses
            else ""
        ),
    ]
    if duplicates:
        lines.append(f"duplicates: {dict(duplicates)}")
    tree_lines = trees.splitlines()
    if len(tree_lines) > 80:
        tree_lines = [*tree_lines[:80], f"... ({len(tree_lines) - 80} more lines)"]
    lines.extend(tree_lines)
    return "\n".join(lines)

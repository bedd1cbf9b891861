"""The canvas root's span, as the Langfuse SDK would write it, made into one spool record.

Built by hand (a ``ReadableSpan`` with the SDK's attribute names, scope ``langfuse-sdk`` and
the public key as scope attribute, as the SDK's tracer makes them) rather than through a
Langfuse client: the sending process may have none, and this costs a few tens of
microseconds. A top-level root carries the trace attributes of ``trace_attributes`` (user,
session, tags, metadata, trace name, version) so the trace has them before any member ran.
"""

# ruff: noqa: RUF002  (the canvas names Langfuse shows use the multiplication sign)
from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tracing import _sdk
from tracing._config import Config
from tracing.instrumentation._payload import clean_text, render_attribute
from tracing.instrumentation._propagation import current_attributes
from tracing.instrumentation._task_span import end_attributes, start_attributes
from tracing.spool._spanrecord import span_record

__all__ = ["canvas_frame", "canvas_name", "label"]

logger = logging.getLogger("celery_langfuse")

_NAMES = _sdk.attribute_names()
_MAX_NAMES = 3
_TIMES = "\N{MULTIPLICATION SIGN}"
_resources: dict[tuple[str | None, str | None], Resource] = {}
_scopes: dict[str, InstrumentationScope] = {}


def label(sig: Any) -> str:
    """A signature's name: the task's, or ``chain(a → b)`` / ``group(a ×2)`` /
    ``chord(a ×2 → b)`` for a canvas inside a canvas."""
    kind = str(_get(sig, "task", "") or "?")
    kwargs = _get(sig, "kwargs", {}) or {}
    if kind == "celery.chain" and kwargs.get("tasks"):
        return "chain(" + " → ".join(label(t) for t in kwargs["tasks"]) + ")"
    if kind == "celery.group" and kwargs.get("tasks") is not None:
        return f"group({_counted(list(kwargs['tasks']))})"
    if kind == "celery.chord" and kwargs.get("header") is not None:
        header = kwargs["header"]
        members = list(_get(header, "kwargs", {}).get("tasks", header) or ())
        body = kwargs.get("body")
        return f"chord({_counted(members)}" + (f" → {label(body)})" if body else ")")
    return kind


def _get(sig: Any, key: str, default: Any) -> Any:
    return sig.get(key, default) if isinstance(sig, dict) else default  # a Signature is one


def _counted(members: list[Any]) -> str:
    return _counted_labels([label(m) for m in members])


def _counted_labels(labels: list[str]) -> str:
    counts = collections.Counter(labels)
    first = list(counts.items())[:_MAX_NAMES]
    parts = [name if n == 1 else f"{name} {_TIMES}{n}" for name, n in first]
    if len(counts) > _MAX_NAMES:
        parts.append(f"+{len(counts) - _MAX_NAMES} more")
    return ", ".join(parts)


def canvas_name(kind: str, members: list[Any], callback: Any,
                labels: list[str] | None = None) -> str:
    """``chord: tasks.summarize ×4 → tasks.combine_summaries``, ``group: tasks.x ×3``."""
    name = f"{kind}: {_counted_labels(labels or [label(m) for m in members])}"
    return name + (f" → {label(callback)}" if callback is not None else "")


def _member(sig: Any, name: str | None = None) -> dict[str, Any]:
    options = _get(sig, "options", {}) or {}
    entry: dict[str, Any] = {"task": name or label(sig)}
    if options.get("task_id"):
        entry["id"] = options["task_id"]
    entry["args"] = list(_get(sig, "args", ()) or ())
    entry["kwargs"] = dict(_get(sig, "kwargs", {}) or {}) if "(" not in entry["task"] else {}
    return entry


def _input_text(value: Any, config: Config) -> str:
    """The members as the task input is rendered (mask, redaction, cap); plain JSON with
    nothing to redact or cap is taken as it is (a few microseconds instead of a walk)."""
    if config.mask is not None:
        try:
            value = config.mask(data=value)
        except Exception:
            logger.exception("celery-langfuse: the mask function failed; the canvas input "
                             "is withheld")
            return "<withheld: mask failed>"
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        fits = len(text.encode("utf-8")) <= config.max_payload_bytes
    except (TypeError, ValueError, RecursionError):  # not plain JSON, or a lone surrogate
        fits = False
    if fits and not any(_secret_key(m.get(part), config.redact_keys, 1)
                        for m in _entries(value) for part in ("args", "kwargs")):
        return text
    return render_attribute(value, redact=config.redact_keys, max_bytes=config.max_payload_bytes)


def _entries(value: Any) -> list[Any]:
    """The member entries of a canvas input (``members`` and ``callback``); the whole value,
    as one entry to look into, if a mask changed its shape."""
    if isinstance(value, Mapping) and isinstance(value.get("members"), list):
        entries = [m for m in value["members"] if isinstance(m, Mapping)]
        if isinstance(value.get("callback"), Mapping):
            entries.append(value["callback"])
        if len(entries) == len(value["members"]) + ("callback" in value):
            return entries
    return [{"kwargs": value}]


def _secret_key(value: Any, redact: Any, depth: int) -> bool:
    """True if a key anywhere in ``value`` matches the redaction pattern (or it is deep)."""
    if depth > 16:
        return True
    if isinstance(value, dict):  # not the Mapping ABC: its isinstance is ten times slower
        for key, item in value.items():
            if _secret_name(str(key), redact) or _secret_key(item, redact, depth + 1):
                return True
    elif isinstance(value, (list, tuple)):
        return any(_secret_key(item, redact, depth + 1) for item in value
                   if isinstance(item, (dict, list, tuple)))
    elif isinstance(value, Mapping):
        return True  # some other mapping: let the full rendering look into it
    return False


_verdicts: dict[tuple[Any, str], bool] = {}


def _secret_name(key: str, redact: Any) -> bool:
    """The pattern's verdict on a key, remembered (canvases repeat their keys)."""
    verdict = _verdicts.get((redact, key))
    if verdict is None:
        if len(_verdicts) > 4096:
            _verdicts.clear()
        verdict = _verdicts[(redact, key)] = bool(redact.search(key))
    return verdict


def _sent_ids(result: Any) -> list[str]:
    results = getattr(result, "results", None)
    if results is None:
        return []
    return [str(r.id) for r in results if getattr(r, "id", None)]


def canvas_frame(config: Config, node: Any, result: Any, error: BaseException | None) -> bytes:
    """The spool frame of ``node``'s observation, ended now."""
    attrs = current_attributes() if node.parent_span_id is None else None
    labels = [label(m) for m in node.members]
    name = (attrs.trace_name if attrs and attrs.trace_name else None) or canvas_name(
        node.kind, node.members, node.callback, labels)
    input_text = output_text = None
    if config.capture_input:
        members: dict[str, Any] = {
            "members": [_member(m, n) for m, n in zip(node.members, labels, strict=True)]}
        if node.callback is not None:
            members["callback"] = _member(node.callback)
        input_text = _input_text(members, config)
    if config.capture_output:
        output_text = json.dumps({"group_id": node.group_id, "task_ids": _sent_ids(result)})
    message = None
    if error is not None:
        message = clean_text(f"publishing failed: {type(error).__name__}: {error}")
    metadata = {"canvas": node.kind, "group_id": node.group_id, "members": len(node.members)}
    attributes = {
        **start_attributes("chain" if node.kind == "chord" else "span", input_text, metadata,
                           config.environment, config.release),
        **end_attributes(output_text, "ERROR" if error else "DEFAULT", message, {}),
        **(_trace_attributes(attrs) if attrs else {}),
    }
    trace_id = node.trace_id
    parent = (SpanContext(trace_id, node.parent_span_id, True, TraceFlags(1))
              if node.parent_span_id else None)
    span = ReadableSpan(
        name=clean_text(name) or node.kind,
        context=SpanContext(trace_id, node.span_id, False, TraceFlags(1)),
        parent=parent,
        resource=_resource(config),
        attributes=attributes,
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, message) if error else Status(StatusCode.UNSET),
        start_time=node.started_ns,
        end_time=max(time.time_ns(), node.started_ns),
        instrumentation_scope=_scope(config.public_key or ""),
    )
    return span_record(span)


def _trace_attributes(attrs: Any) -> dict[str, Any]:
    """The trace attributes as ``propagate_attributes`` writes them on each observation."""
    out: dict[str, Any] = {}
    if attrs.trace_name:
        out[_NAMES.TRACE_NAME] = attrs.trace_name
    if attrs.user_id:
        out[_NAMES.TRACE_USER_ID] = attrs.user_id
    if attrs.session_id:
        out[_NAMES.TRACE_SESSION_ID] = attrs.session_id
    if attrs.tags:
        out[_NAMES.TRACE_TAGS] = tuple(attrs.tags)
    if attrs.version:
        out[_NAMES.VERSION] = attrs.version
    for key, value in attrs.metadata.items():
        out[f"{_NAMES.TRACE_METADATA}.{key}"] = value if isinstance(value, str) else str(value)
    return out


def _resource(config: Config) -> Resource:
    key = (config.environment, config.release)
    resource = _resources.get(key)
    if resource is None:
        values = {_NAMES.ENVIRONMENT: config.environment, _NAMES.RELEASE: config.release}
        resource = _resources[key] = Resource({k: v for k, v in values.items() if v})
    return resource


def _scope(public_key: str) -> InstrumentationScope:
    scope = _scopes.get(public_key)
    if scope is None:
        scope = _scopes[public_key] = InstrumentationScope(
            _sdk.TRACER_NAME, _sdk.sdk_version(), None, {"public_key": public_key})
    return scope

"""The canvas root's observation, as the Langfuse SDK would write it, as one spool record.

Written straight as a compact span record (``_spanrecord.compact_span_record``), not through
a Langfuse client or an OpenTelemetry span: the sending process may have no client, and
this is on the sender's path once per canvas. The record holds what the SDK's tracer would
have put in the span: its attribute names, scope ``langfuse-sdk`` with the public key as
scope attribute, the environment and release as resource attributes, kind INTERNAL. What
does not change from canvas to canvas (the resource and scope blobs, the observation type,
environment and release attributes) is made once per configuration. A top-level root
carries the trace attributes of ``trace_attributes`` (user, session, tags, metadata, trace
name, version) so the trace has them before any member ran.
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
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from tracing import _sdk
from tracing._config import Config
from tracing.instrumentation._payload import clean_text, render_attribute
from tracing.instrumentation._propagation import current_attributes
from tracing.instrumentation._task_span import json_text
from tracing.spool._spanrecord import (
    compact_span_record,
    parent_flags,
    resource_blob,
    scope_blob,
)

__all__ = ["canvas_frame", "canvas_name", "label"]

logger = logging.getLogger("celery_langfuse")

_NAMES = _sdk.attribute_names()
_MAX_NAMES = 3
_TIMES = "\N{MULTIPLICATION SIGN}"
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_UNSET, _ERROR = 0, 2  # OpenTelemetry status codes
_INTERNAL = 0  # SpanKind.INTERNAL


def label(sig: Any) -> str:
    """A signature's name: the task's, or ``chain(a → b)`` / ``group(a ×2)`` /
    ``chord(a ×2 → b)`` for a canvas inside a canvas."""
    if not isinstance(sig, dict):  # a Signature is one
        return "?"
    kind = str(sig.get("task", "") or "?")
    if not kind.startswith("celery."):
        return kind  # a task: most members
    kwargs = sig.get("kwargs", {}) or {}
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
    """A member's entry in the canvas input: task, id (if frozen), args, kwargs (a canvas
    inside the canvas shows its name, not its members' kwargs)."""
    task = name or label(sig)
    if not isinstance(sig, dict):
        return {"task": task, "args": [], "kwargs": {}}
    entry: dict[str, Any] = {"task": task}
    task_id = (sig.get("options") or {}).get("task_id")
    if task_id:
        entry["id"] = task_id
    entry["args"] = list(sig.get("args") or ())
    entry["kwargs"] = dict(sig.get("kwargs") or {}) if "(" not in task else {}
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
        text = _JSON.encode(value)  # json.dumps(value, ensure_ascii=False, ...), no new encoder
        size = len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii: O(1)
        fits = size <= config.max_payload_bytes
    except (TypeError, ValueError, RecursionError):  # not plain JSON, or a lone surrogate
        fits = False
    if fits and not _any_secret_key(_entries(value), config.redact_keys):
        return text
    return render_attribute(value, redact=config.redact_keys, max_bytes=config.max_payload_bytes)


def _entries(value: Any) -> list[Any]:
    """The member entries of a canvas input (``members`` and ``callback``); the whole value,
    as one entry to look into, if a mask changed its shape."""
    if isinstance(value, Mapping) and isinstance(value.get("members"), list):
        entries = [m for m in value["members"] if type(m) is dict or isinstance(m, Mapping)]
        callback = value.get("callback")
        if type(callback) is dict or isinstance(callback, Mapping):
            entries.append(callback)
        if len(entries) == len(value["members"]) + ("callback" in value):
            return entries
    return [{"kwargs": value}]


def _any_secret_key(entries: list[Any], redact: Any) -> bool:
    for entry in entries:
        if _secret_key(entry.get("args"), redact, 1) or _secret_key(
                entry.get("kwargs"), redact, 1):
            return True
    return False


_LEAVES = frozenset((str, int, float, bool, type(None)))


def _secret_key(value: Any, redact: Any, depth: int) -> bool:
    """True if a key anywhere in ``value`` matches the redaction pattern, or a value is
    deeper than 16 levels (``value`` being at ``depth``). Leaves are skipped without a call;
    exact dicts, lists and tuples without the ABCs' ``isinstance`` (ten times slower)."""
    kind = type(value)
    if kind in _LEAVES:
        return False
    if depth > 16:
        return True
    if kind is dict or isinstance(value, dict):
        if depth == 16 and value:
            return True  # its items are deeper than 16
        verdicts = _verdicts
        for key, item in value.items():
            name = key if type(key) is str else str(key)
            verdict = verdicts.get((redact, name))
            if verdict is None:
                verdict = _secret_name(name, redact)
            if verdict or (type(item) not in _LEAVES and _secret_key(item, redact, depth + 1)):
                return True
        return False
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        for item in value:
            if type(item) not in _LEAVES and _secret_key(item, redact, depth + 1):
                return True
        return False
    return isinstance(value, Mapping)  # some other mapping: the full rendering looks into it


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
    """The spool frame of ``node``'s observation, ended now: the attributes the SDK's
    ``start_observation(as_type=...)`` and ``update(...)`` would write (in that order: type,
    input, environment, release, metadata; level, output, status message), then the trace
    attributes of a top-level root."""
    attrs = current_attributes() if node.parent_span_id is None else None
    labels = [label(m) for m in node.members]
    name = (attrs.trace_name if attrs and attrs.trace_name else None) or canvas_name(
        node.kind, node.members, node.callback, labels)
    as_type, place, blobs = _per_config(config, node.kind)
    attributes: dict[str, Any] = {_NAMES.OBSERVATION_TYPE: as_type}
    if config.capture_input:
        members: dict[str, Any] = {
            "members": [_member(m, n) for m, n in zip(node.members, labels, strict=True)]}
        if node.callback is not None:
            members["callback"] = _member(node.callback)
        attributes[_NAMES.OBSERVATION_INPUT] = _input_text(members, config)
    attributes.update(place)  # environment, release
    metadata = _NAMES.OBSERVATION_METADATA
    attributes[f"{metadata}.canvas"] = json_text(node.kind)
    attributes[f"{metadata}.group_id"] = json_text(node.group_id)
    attributes[f"{metadata}.members"] = json_text(len(node.members))
    attributes[_NAMES.OBSERVATION_LEVEL] = "ERROR" if error else "DEFAULT"
    if config.capture_output:
        attributes[_NAMES.OBSERVATION_OUTPUT] = json.dumps(
            {"group_id": node.group_id, "task_ids": _sent_ids(result)})
    message = None
    if error is not None:
        message = clean_text(f"publishing failed: {type(error).__name__}: {error}")
        attributes[_NAMES.OBSERVATION_STATUS_MESSAGE] = message
    if attrs:
        attributes.update(_trace_attributes(attrs))
    parent = node.parent_span_id
    fields = (clean_text(name) or node.kind, _INTERNAL,
              parent.to_bytes(8, "big") if parent else None, parent_flags(bool(parent)),
              node.started_ns, max(time.time_ns(), node.started_ns),
              _ERROR if error else _UNSET, message, attributes, (), (), None, 0, 0, 0, *blobs)
    try:
        return compact_span_record(node.trace_id, node.span_id, fields)
    except ValueError:  # a user's value marshal refuses (a str subclass in trace attributes)
        plain = {key: _plain(value) for key, value in attributes.items()}
        return compact_span_record(node.trace_id, node.span_id,
                                   (_plain(fields[0]), *fields[1:8], plain, *fields[9:]))


def _plain(value: Any) -> Any:
    """``value`` with subclasses of str, int, float (and in tuples) as their base type, the
    value OpenTelemetry's encoder would send for them."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)  # the characters, not what a subclass's __str__ says
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(item) for item in value)
    return value


_Shared = tuple[str, dict[str, str], tuple[bytes, bytes]]
_shared: dict[tuple[str, str | None, str | None, str], _Shared] = {}


def _per_config(config: Config, kind: str) -> _Shared:
    """What every canvas root of this configuration and kind shares: its observation type,
    its environment and release attributes, and its resource and scope blobs."""
    key = (kind, config.environment, config.release, config.public_key or "")
    hit = _shared.get(key)
    if hit is None:
        values = {_NAMES.ENVIRONMENT: config.environment, _NAMES.RELEASE: config.release}
        place = {k: v for k, v in values.items() if v}
        scope = InstrumentationScope(_sdk.TRACER_NAME, _sdk.sdk_version(), None,
                                     {"public_key": config.public_key or ""})
        if len(_shared) > 64:
            _shared.clear()
        hit = _shared[key] = ("chain" if kind == "chord" else "span", place,
                              (resource_blob(Resource(place)), scope_blob(scope)))
    return hit


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

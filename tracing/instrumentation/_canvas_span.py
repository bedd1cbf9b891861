"""The canvas root's observation, as the Langfuse SDK would write it, as one spool record.

Written straight as a compact span record (``_spanrecord.compact_span_record``), not through
a Langfuse client or an OpenTelemetry span: the sending process may have no client, and
this is on the sender's path once per canvas. The record holds what the SDK's tracer would
have put in the span: its attribute names, scope ``langfuse-sdk`` with the public key as
scope attribute, the environment and release as resource attributes, kind INTERNAL. What
does not change from canvas to canvas (the resource and scope blobs, the observation type,
environment and release attributes) is made once per configuration; what depends only on
the canvas's shape (its kind and task names: the name, the labels) once per shape. The
members' input is written as JSON text straight from the signatures when there is nothing
to mask, redact or cap (the same text the full rendering makes); else it is rendered like a
task's input. A top-level root carries the trace attributes of ``trace_attributes`` (user,
session, tags, metadata, trace name, version) so the trace has them before any member ran.
"""

# ruff: noqa: RUF002  (the canvas names Langfuse shows use the multiplication sign)
from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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

__all__ = ["canvas_frame", "canvas_name", "is_task", "label"]

logger = logging.getLogger("celery_langfuse")

_NAMES = _sdk.attribute_names()
_MAX_NAMES = 3
_TIMES = "\N{MULTIPLICATION SIGN}"
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_UNSET, _ERROR = 0, 2  # OpenTelemetry status codes
_INTERNAL = 0  # SpanKind.INTERNAL
_TYPE, _INPUT, _OUTPUT = (_NAMES.OBSERVATION_TYPE, _NAMES.OBSERVATION_INPUT,
                          _NAMES.OBSERVATION_OUTPUT)
_LEVEL, _STATUS_MESSAGE = _NAMES.OBSERVATION_LEVEL, _NAMES.OBSERVATION_STATUS_MESSAGE
_META_CANVAS = f"{_NAMES.OBSERVATION_METADATA}.canvas"
_META_GROUP = f"{_NAMES.OBSERVATION_METADATA}.group_id"
_META_MEMBERS = f"{_NAMES.OBSERVATION_METADATA}.members"


def label(sig: Any) -> str:
    """A signature's name: the task's, or ``chain(a → b)`` / ``group(a ×2)`` /
    ``chord(a ×2 → b)`` for a canvas inside a canvas, ``starmap(a)`` / ``map(a)`` for a
    chunk of ``chunks`` / ``map`` / ``starmap`` (Celery's built-in tasks running ``a``)."""
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
    if kind in _MAPS and kwargs.get("task") is not None:
        return f"{_MAPS[kind]}({label(kwargs['task'])})"
    return kind


_MAPS = {"celery.starmap": "starmap", "celery.map": "map"}


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


class _Shape(NamedTuple):
    """What a canvas's record takes from its shape alone (its kind and its members' and
    callback's task names), made once per shape: canvases sent in a loop repeat theirs."""

    name: str  # the observation name (surrogates replaced)
    labels: tuple[str, ...]  # each member's label
    callback: str | None  # the callback's label
    texts: tuple[str, ...]  # the labels as JSON text, the callback's last
    kind_text: str  # metadata.canvas, as JSON
    count_text: str  # metadata.members, as JSON
    plain: bool  # every member (and the callback) a task signature: the direct input path


_shapes: dict[tuple[Any, ...], _Shape] = {}


def _shape(kind: str, members: list[Any], callback: Any) -> _Shape:
    """The shape of a canvas; cached only for canvases of task signatures (a canvas inside
    the canvas is labelled from its contents, which its task name does not say)."""
    key = (kind, callback.get("task") if isinstance(callback, dict) else (
        None if callback is None else _NOT_A_TASK),
           *[m.get("task") if isinstance(m, dict) else _NOT_A_TASK for m in members])
    try:
        hit = _shapes.get(key)
    except TypeError:  # a task name that is not text (and not hashable)
        return _make_shape(kind, members, callback)
    if hit is None:
        hit = _make_shape(kind, members, callback)
        if hit.plain:  # then the key holds every label
            if len(_shapes) > 256:
                _shapes.clear()
            _shapes[key] = hit
    return hit


_NOT_A_TASK = object()


def is_task(sig: Any) -> bool:
    """A task signature (a Signature is a dict), not a canvas or anything else."""
    task = sig.get("task") if isinstance(sig, dict) else None
    return type(task) is str and not task.startswith("celery.") and "(" not in task


def _make_shape(kind: str, members: list[Any], callback: Any) -> _Shape:
    labels = tuple(label(m) for m in members)
    cleaned = clean_text(canvas_name(kind, members, callback, list(labels))) or kind
    plain = all(is_task(m) for m in members) and (callback is None or is_task(callback))
    callback_label = label(callback) if callback is not None else None
    texts = tuple(_encode_str(n) for n in (*labels, *([callback_label] if callback_label else [])))
    return _Shape(cleaned, labels, callback_label, texts, json_text(kind),
                  json_text(len(members)), plain)


def _members_value(node: Any, shape: _Shape) -> dict[str, Any]:
    """The canvas input: its members' entries and the callback's (``_member``)."""
    value: dict[str, Any] = {
        "members": [_member(m, n) for m, n in zip(node.members, shape.labels, strict=True)]}
    if node.callback is not None:
        value["callback"] = _member(node.callback, shape.callback)
    return value


def _members_text(node: Any, shape: _Shape, config: Config) -> str | None:
    """The canvas input as JSON text, written straight from a canvas of task signatures: the
    text ``_input_text`` makes of ``_members_value`` when there is no mask, every args is a
    list or tuple and every kwargs a dict with text keys, no key at any depth looks secret,
    nothing is deeper than 16 levels and it fits the payload cap; else None (then
    ``_input_text`` renders it). Leaf values are written here, anything else by the
    encoder (Python 3.11's builds a list of items per dict: twice the time)."""
    if config.mask is not None:
        return None
    verdicts, redact = _verdicts_for(config.redact_keys)
    callback = node.callback
    entries: list[str] = []
    try:
        for sig, task in zip((*node.members, callback) if callback is not None else node.members,
                             shape.texts, strict=False):
            args, kwargs = sig.get("args") or (), sig.get("kwargs") or {}
            if type(kwargs) is not dict or (type(args) is not tuple and type(args) is not list):
                return None
            items = []
            for key, item in kwargs.items():
                verdict = verdicts.get(key)
                if verdict is None:
                    if type(key) is not str:
                        return None
                    verdict = _secret_name(key, redact)
                if verdict:
                    return None
                leaf = _LEAF_JSON.get(type(item))
                if leaf is None and _secret_key(item, redact, 2):
                    return None
                items.append(f"{_encode_str(key)}:{leaf(item) if leaf else _JSON.encode(item)}")
            values = []
            for item in args:
                leaf = _LEAF_JSON.get(type(item))
                if leaf is None and _secret_key(item, redact, 2):
                    return None
                values.append(leaf(item) if leaf else _JSON.encode(item))
            options = sig.get("options")
            task_id = options.get("task_id") if options else None
            if not task_id:
                ident = ""
            elif type(task_id) is str:
                ident = f',"id":{_encode_str(task_id)}'
            else:
                ident = f',"id":{_JSON.encode(task_id)}'
            entries.append(f'{{"task":{task}{ident},"args":[{",".join(values)}],'
                           f'"kwargs":{{{",".join(items)}}}}}')
        if callback is not None:
            text = f'{{"members":[{",".join(entries[:-1])}],"callback":{entries[-1]}}}'
        else:
            text = f'{{"members":[{",".join(entries)}]}}'
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError):  # not plain JSON, or a lone surrogate
        return None
    return text if size <= config.max_payload_bytes else None


_encode_str = json.encoder.encode_basestring  # what _JSON writes for a str
_LEAF_JSON: dict[type, Callable[[Any], str]] = {  # exactly these types; float: the encoder
    str: _encode_str, int: int.__repr__, bool: lambda flag: "true" if flag else "false",
    type(None): lambda _: "null"}


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
        verdicts = _verdicts_for(redact)[0]
        for key, item in value.items():
            name = key if type(key) is str else str(key)
            verdict = verdicts.get(name)
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


_verdicts: tuple[Any, dict[str, bool]] = (None, {})  # (pattern, key -> its verdict)


def _verdicts_for(redact: Any) -> tuple[dict[str, bool], Any]:
    """The remembered verdicts of the pattern ``redact`` on keys (canvases repeat their
    keys), by the pattern's identity: hashing a compiled pattern hashes its whole code."""
    global _verdicts
    if _verdicts[0] is not redact:
        _verdicts = (redact, {})
    return _verdicts[1], redact


def _secret_name(key: str, redact: Any) -> bool:
    """The pattern's verdict on a key, remembered."""
    verdicts = _verdicts_for(redact)[0]
    verdict = verdicts.get(key)
    if verdict is None:
        if len(verdicts) > 4096:
            verdicts.clear()
        verdict = verdicts[key] = bool(redact.search(key))
    return verdict


def _output_text(group_id: str, result: Any) -> str:
    """``json.dumps({"group_id": group_id, "task_ids": [...the ids sent...]})``, written
    directly (its default separators and ASCII escapes)."""
    results = getattr(result, "results", None)
    ids = [_ascii(str(r.id)) for r in results if getattr(r, "id", None)] if results else ()
    return f'{{"group_id": {_ascii(group_id)}, "task_ids": [{", ".join(ids)}]}}'


_ascii = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str


def canvas_frame(config: Config, node: Any, result: Any, error: BaseException | None) -> bytes:
    """The spool frame of ``node``'s observation, ended now: the attributes the SDK's
    ``start_observation(as_type=...)`` and ``update(...)`` would write (in that order: type,
    input, environment, release, metadata; level, output, status message), then the trace
    attributes of a top-level root."""
    attrs = current_attributes() if node.parent_span_id is None else None
    shape = _shape(node.kind, node.members, node.callback)
    as_type, place, blobs = _per_config(config, node.kind)
    attributes: dict[str, Any] = {_TYPE: as_type}
    if config.capture_input:
        text = _members_text(node, shape, config) if shape.plain else None
        attributes[_INPUT] = text if text is not None else _input_text(
            _members_value(node, shape), config)
    attributes.update(place)  # environment, release
    attributes[_META_CANVAS] = shape.kind_text
    group_id = node.group_id
    attributes[_META_GROUP] = _encode_str(group_id) if type(group_id) is str else json_text(
        group_id)
    attributes[_META_MEMBERS] = shape.count_text
    attributes[_LEVEL] = "ERROR" if error else "DEFAULT"
    if config.capture_output:
        attributes[_OUTPUT] = _output_text(node.group_id, result)
    message = None
    if error is not None:
        message = clean_text(f"publishing failed: {type(error).__name__}: {error}")
        attributes[_STATUS_MESSAGE] = message
    name = shape.name
    if attrs:
        attributes.update(_trace_attributes(attrs))
        if attrs.trace_name:
            name = clean_text(attrs.trace_name) or node.kind
    parent = node.parent_span_id
    fields = (name, _INTERNAL, parent.to_bytes(8, "big") if parent else None,
              parent_flags(bool(parent)), node.started_ns, max(time.time_ns(), node.started_ns),
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

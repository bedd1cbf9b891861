"""Span records: the compact form a task writes, and the OTLP the shipper sends.

Encoding a span as OTLP protobuf with OpenTelemetry's Python encoder is most of what a span
costs in the pool child, on the task's path. So the exporter writes the span's fields in a
compact form and the shipper turns them into OTLP at send time, off the task's path
(appending a task span to the spool: 17-25 µs median instead of 155-183 µs, alternated in
one run, ``spool_costs`` in bench/results.jsonl). marshal was measured against pickle,
msgpack and orjson for the field tuple: all 1.4-2 µs, so the standard library's needs no
new dependency; building the tuple (~11 µs) is most of the cost.

Span record payload (``KIND_SPAN``, see ``_spool``)
--------------------------------------------------
::

    offset  size  field
    0       8     span id (big-endian, as in OTLP)
    8       16    trace id
    24      n     body; its first byte says how it is encoded:
                    0x0A  OTLP: a serialized ``ExportTraceServiceRequest`` holding exactly this
                          span (version 1, written by celery-langfuse 0.1; 0x0A is protobuf's
                          tag of field 1, length-delimited, which every such request starts with)
                    0x02  compact (version 2): the byte 0x02, then ``marshal.dumps(fields, 4)``

The ids stay in front so the shipper can batch, split, dead-letter and de-duplicate without
decoding. A protobuf message never starts with 0x02 (field number 0 does not exist), so the
two bodies cannot be mistaken for each other, and a record's crc32 (the frame) already
guards every byte. A version-1 record is sent as it is; a version-2 record is encoded to the
same OTLP by ``otlp_request`` (tests compare the two byte for byte after parsing).

Compact fields (version 2): a tuple of 17 plain values (``str``, ``int``, ``float``, ``bool``,
``bytes``, ``None``, tuples, dicts: marshal's format 4, unchanged since Python 3.4)::

    0  name                str
    1  kind                int, OpenTelemetry ``SpanKind`` value (INTERNAL=0 ... CONSUMER=4)
    2  parent span id      bytes(8) or None
    3  flags               int, OTLP span flags (0x100 has-is-remote, 0x200 parent is remote)
    4  start, 5 end        int, ns since the epoch
    6  status code         int (UNSET=0, OK=1, ERROR=2)
    7  status message      str or None
    8  attributes          dict: str -> value (str, bool, int, float, bytes, tuple of them)
    9  events              tuple of (name, time ns, attributes, dropped attribute count)
    10 links               tuple of (trace id, span id, attributes, dropped count, flags)
    11 trace state         str or None (W3C ``tracestate`` text)
    12-14                  dropped attribute / event / link counts
    15 resource            bytes: ``marshal.dumps((attributes, schema_url), 4)``
    16 scope               bytes: ``marshal.dumps((name, version, schema_url, attributes), 4)``,
                           or b"" for none

Resource and scope are nested marshal blobs so both sides cache them by value (every span of
a process shares them): the writer marshals each once, the shipper encodes each once.
A body that does not decode is an error the shipper dead-letters with the reason; it is never
dropped silently. A writer that meets a value marshal refuses writes that span as version 1.

Two writers: :func:`span_record` for an OpenTelemetry ``ReadableSpan`` (the exporter), and
:func:`compact_span_record` for a writer that has the fields without building a span (the
canvas root, ``_canvas_span``: one record per canvas, at publish, where building the span
and its context objects cost more than the record).
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan

from tracing.spool import KIND_SPAN, encode_frame

__all__ = ["BODY_COMPACT", "BODY_OTLP", "as_lists", "compact_span_record", "encode_record",
           "event_fields", "link_fields", "origin_of", "otlp_batch", "otlp_request", "otlp_span",
           "parent_flags", "resource_blob", "scope_blob", "span_record", "trace_state_text"]

BODY_OTLP = 0x0A
BODY_COMPACT = 0x02
_COMPACT = b"\x02"
_IDS = 24
_MARSHAL_VERSION = 4
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200

# --------------------------------------------------------------------------- writing


class _BlobCache:
    """marshal blobs of resources / scopes, by object identity (a process has a handful)."""

    def __init__(self) -> None:
        self._blobs: dict[int, tuple[Any, bytes]] = {}

    def get(self, obj: Any, make: Any) -> bytes:
        hit = self._blobs.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        blob: bytes = make(obj)
        if len(self._blobs) > 64:
            self._blobs.clear()
        self._blobs[id(obj)] = (obj, blob)
        return blob


_resources, _scopes = _BlobCache(), _BlobCache()


def _resource_blob(resource: Any) -> bytes:
    return marshal.dumps((dict(resource.attributes), resource.schema_url or None),
                         _MARSHAL_VERSION)


def _scope_blob(scope: Any) -> bytes:
    if scope is None:
        return b""
    return marshal.dumps((scope.name, scope.version, scope.schema_url or None,
                          dict(scope.attributes or {})), _MARSHAL_VERSION)


def resource_blob(resource: Any) -> bytes:
    """Field 15 of a compact record for ``resource`` (cached by identity)."""
    return _resources.get(resource, _resource_blob)


def scope_blob(scope: Any) -> bytes:
    """Field 16 of a compact record for ``scope`` (cached by identity; b"" for none)."""
    return _scopes.get(scope, _scope_blob)


_Origin = tuple[dict[str, Any], str | None, str, dict[str, Any]]
_origins: dict[tuple[bytes, bytes], _Origin] = {}


def origin_of(resource: bytes, scope: bytes) -> _Origin:
    """(resource attributes, scope name, scope version, scope attributes) of a resource and
    a scope blob (name None for no scope; sequences as lists, as JSON would give them),
    decoded once per distinct pair (a process writes one): shared, never to be changed."""
    key = (resource, scope)
    hit = _origins.get(key)
    if hit is None:
        name, version, _schema, attributes = marshal.loads(scope) if scope else (
            None, "", None, {})
        hit = (as_lists(marshal.loads(resource)[0]), name, version or "",
               as_lists(attributes or {}))
        if len(_origins) > 256:
            _origins.clear()
        _origins[key] = hit
    return hit


def as_lists(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``attributes`` with tuple values as lists (as JSON would give them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()}


def _flags(parent: Any) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)


def parent_flags(parent_is_remote: bool) -> int:
    """Field 3 of a compact record: the OTLP span flags for a parent that is remote or not
    (also the value for no parent: ``False``)."""
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent_is_remote else 0)


def event_fields(events: Sequence[Any]) -> tuple[Any, ...]:
    """Field 9 of a compact record for OpenTelemetry ``Event`` objects."""
    return tuple((e.name, e.timestamp, dict(e.attributes or {}), e.dropped_attributes)
                 for e in events)


def link_fields(links: Sequence[Any]) -> tuple[Any, ...]:
    """Field 10 of a compact record for OpenTelemetry ``Link`` objects."""
    return tuple((link.context.trace_id.to_bytes(16, "big"),
                  link.context.span_id.to_bytes(8, "big"), dict(link.attributes or {}),
                  link.dropped_attributes, _flags(link.context)) for link in links)


def trace_state_text(trace_state: Any) -> str | None:
    """Field 11 of a compact record: W3C ``tracestate`` text (None for an empty state)."""
    return ",".join(f"{k}={v}" for k, v in trace_state.items()) if trace_state else None


def encode_record(span: ReadableSpan) -> bytes:
    """The KIND_SPAN payload of ``span``: its ids, then the compact body (or OTLP, see above)."""
    context = span.get_span_context()
    assert context is not None
    ids = context.span_id.to_bytes(8, "big") + context.trace_id.to_bytes(16, "big")
    parent = span.parent
    status = span.status
    trace_state = context.trace_state
    try:
        fields = (
            span.name, span.kind.value, parent.span_id.to_bytes(8, "big") if parent else None,
            _flags(parent), span.start_time, span.end_time, status.status_code.value,
            status.description, dict(span.attributes or {}),
            event_fields(span.events) if span.events else (),
            link_fields(span.links) if span.links else (),
            trace_state_text(trace_state) if trace_state else None,
            span.dropped_attributes, span.dropped_events, span.dropped_links,
            _resources.get(span.resource, _resource_blob),
            _scopes.get(span.instrumentation_scope, _scope_blob),
        )
        return ids + _COMPACT + marshal.dumps(fields, _MARSHAL_VERSION)
    except ValueError:  # a value marshal cannot write: fall back to version 1
        return ids + encode_spans([span]).SerializeToString()


def span_record(span: ReadableSpan) -> bytes:
    """One spool frame holding ``span``."""
    return encode_frame(KIND_SPAN, encode_record(span))


def compact_span_record(trace_id: int, span_id: int, fields: tuple[Any, ...]) -> bytes:
    """One spool frame holding a compact (version 2) record of ``fields``, the 17 fields
    above in their order, for the span ``span_id`` of trace ``trace_id``. Raises
    ``ValueError`` for a value marshal refuses (the caller has no span to fall back to)."""
    if len(fields) != 17:
        raise ValueError(f"a compact span record has 17 fields, not {len(fields)}")
    ids = span_id.to_bytes(8, "big") + trace_id.to_bytes(16, "big")
    return encode_frame(KIND_SPAN, ids + _COMPACT + marshal.dumps(fields, _MARSHAL_VERSION))


# --------------------------------------------------------------------------- OTLP


_SMALL = tuple(bytes((i,)) for i in range(128))


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0 < n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field."""
    n = len(data)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + data


_Q = struct.Struct("<Q")
_D = struct.Struct("<d")
_I = struct.Struct("<I")


def _value(value: Any) -> bytes:
    """An ``AnyValue`` message body, as OpenTelemetry's encoder builds it."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _D.pack(value)
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, Sequence):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _value(v)) for v in value))
    if isinstance(value, Mapping):
        return _ld(b"\x32", _attributes(value, b"\x0a"))
    raise TypeError(f"attribute value of type {type(value).__name__} cannot be encoded")


# Encoded KeyValue fields of short scalar attributes, which repeat from span to span (the
# observation type, model, environment, ...). Keyed with the value's type: True == 1.
_SCALARS = (str, bool, int)  # not float: -0.0 == 0.0
_kv_cache: dict[tuple[bytes, str, type, Any], bytes] = {}


_keys: dict[str, bytes] = {}  # encoded key fields: attribute keys are few


def _key_value(tag: bytes, key: str, value: Any) -> bytes:
    field = _keys.get(key)
    if field is None:
        if len(_keys) > 4096:
            _keys.clear()
        field = _keys[key] = _ld(b"\x0a", str(key).encode("utf-8", "surrogatepass"))
    if type(value) is str:
        inner = _ld(b"\x0a", value.encode("utf-8", "surrogatepass"))
    else:
        inner = _value(value)
    return _ld(tag, field + _ld(b"\x12", inner))


def _attributes(attributes: Mapping[str, Any], tag: bytes) -> bytes:
    """Repeated ``KeyValue`` fields with ``tag``."""
    out = []
    for key, value in attributes.items():
        kind = type(value)
        if kind not in _SCALARS or (kind is str and len(value) > 64):
            out.append(_key_value(tag, key, value))
            continue
        cache_key = (tag, key, kind, value)
        field = _kv_cache.get(cache_key)
        if field is None:
            if len(_kv_cache) > 4096:
                _kv_cache.clear()
            field = _kv_cache[cache_key] = _key_value(tag, key, value)
        out.append(field)
    return b"".join(out)


def _count(tag: bytes, n: int) -> bytes:
    return tag + _varint(n) if n else b""


def _text(tag: bytes, text: str | None) -> bytes:
    return _ld(tag, text.encode("utf-8", "surrogatepass")) if text else b""


_Head = tuple[bytes, bytes, bytes, bytes]
_heads: dict[tuple[bytes, bytes], _Head] = {}


def _head(resource: bytes, scope: bytes) -> _Head:
    """Encoded (resource, resource schema url, scope, scope schema url) fields, cached."""
    key = (resource, scope)
    hit = _heads.get(key)
    if hit is not None:
        return hit
    attributes, resource_schema = marshal.loads(resource)
    if scope:
        name, version, scope_schema, scope_attributes = marshal.loads(scope)
        scope_field = _ld(b"\x0a", _text(b"\x0a", name) + _text(b"\x12", version)
                          + _attributes(scope_attributes, b"\x1a"))
    else:
        scope_field, scope_schema = b"\x0a\x00", None
    hit = (_ld(b"\x0a", _attributes(attributes, b"\x0a")), _text(b"\x1a", resource_schema),
           scope_field, _text(b"\x1a", scope_schema))
    if len(_heads) > 256:
        _heads.clear()
    _heads[key] = hit
    return hit


_TIMES = struct.Struct("<BQBQ")  # start (field 7) and end (field 8), both fixed64
_FLAGS = struct.Struct("<HI")  # field 16, fixed32: tag 0x85 0x01


def _span(span_id: bytes, trace_id: bytes, f: tuple[Any, ...]) -> bytes:
    (name, kind, parent, flags, start, end, code, message, attributes, events, links,
     trace_state, dropped_attributes, dropped_events, dropped_links) = f[:15]
    out = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        out.append(_text(b"\x1a", trace_state))
    if parent:
        out += (b"\x22\x08", parent) if len(parent) == 8 else (_ld(b"\x22", parent),)
    out += (_text(b"\x2a", name), b"\x30", _varint(kind + 1))
    if start and end:
        out.append(_TIMES.pack(0x39, start, 0x41, end))
    else:
        out += (b"\x39" + _Q.pack(start) if start else b"", b"\x41" + _Q.pack(end) if end else b"")
    out.append(_attributes(attributes, b"\x4a"))
    if dropped_attributes:
        out.append(_count(b"\x50", dropped_attributes))
    for ev_name, ev_time, ev_attributes, ev_dropped in events:
        out.append(_ld(b"\x5a", (b"\x09" + _Q.pack(ev_time) if ev_time else b"")
                       + _text(b"\x12", ev_name) + _attributes(ev_attributes, b"\x1a")
                       + _count(b"\x20", ev_dropped)))
    if dropped_events:
        out.append(_count(b"\x60", dropped_events))
    for link_trace, link_span, link_attributes, link_dropped, link_flags in links:
        out.append(_ld(b"\x6a", _ld(b"\x0a", link_trace) + _ld(b"\x12", link_span)
                       + _attributes(link_attributes, b"\x22") + _count(b"\x28", link_dropped)
                       + b"\x35" + _I.pack(link_flags)))
    if dropped_links:
        out.append(_count(b"\x70", dropped_links))
    if message:
        out.append(_ld(b"\x7a", _text(b"\x12", message) + _count(b"\x18", code)))
    else:
        out.append(_STATUS[code] if 0 <= code < 3 else _ld(b"\x7a", _count(b"\x18", code)))
    out.append(_FLAGS.pack(0x0185, flags))
    return b"".join(out)


_STATUS = (b"\x7a\x00", b"\x7a\x02\x18\x01", b"\x7a\x02\x18\x02")  # code, no message


def otlp_request(payload: bytes) -> bytes:
    """The one-span OTLP ``ExportTraceServiceRequest`` bytes of a KIND_SPAN payload.

    Raises ``ValueError`` for a body that is neither form (the caller dead-letters it).
    """
    return otlp_batch([otlp_span(payload)])


SpanPart = tuple[bytes | None, bytes | None, bytes]


def otlp_span(payload: bytes) -> SpanPart:
    """A KIND_SPAN payload as a part of a request (:func:`otlp_batch`): its resource and
    scope blobs and its encoded ``Span`` message, or for a version-1 body ``(None, None,
    the whole one-span request)``.

    Raises ``ValueError`` for a body that is neither form (the caller dead-letters it).
    """
    body = payload[_IDS:]
    if not body or body[0] != BODY_COMPACT:
        return None, None, body  # version 1: already OTLP (or something Langfuse will judge)
    try:
        fields = marshal.loads(body[1:])
        resource, scope = fields[15], fields[16]
        _head(resource, scope)  # decodable, and cached for the batch
        span = _span(payload[:8], payload[8:_IDS], fields)
    except (EOFError, ValueError, TypeError, IndexError, struct.error) as exc:
        raise ValueError(f"undecodable compact span record: {exc}") from exc
    return resource, scope, span


def otlp_batch(parts: Sequence[SpanPart]) -> bytes:
    """One ``ExportTraceServiceRequest`` of ``parts`` (:func:`otlp_span`): one
    ``ResourceSpans`` per distinct resource, one ``ScopeSpans`` per distinct scope in it,
    each encoded once, in the order first seen, holding its spans in their order; version-1
    requests are appended whole (protobuf concatenation appends their ``ResourceSpans``)."""
    groups: dict[bytes, dict[bytes, list[bytes]]] = {}
    whole: list[bytes] = []
    for resource, scope, data in parts:
        if resource is None or scope is None:
            whole.append(data)
            continue
        scopes = groups.get(resource)
        if scopes is None:
            scopes = groups[resource] = {}
        spans = scopes.get(scope)
        if spans is None:
            spans = scopes[scope] = []
        spans.append(data)
    out = []
    for resource, scopes in groups.items():
        inner = []
        resource_field, resource_schema = _head(resource, next(iter(scopes)))[:2]
        for scope, spans in scopes.items():
            scope_field, scope_schema = _head(resource, scope)[2:]
            inner.append(_ld(b"\x12", scope_field
                             + b"".join([_ld(b"\x12", span) for span in spans])
                             + scope_schema))
        out.append(_ld(b"\x0a", resource_field + b"".join(inner) + resource_schema))
    return b"".join(out) + b"".join(whole)

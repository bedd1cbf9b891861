"""Input/output capture: a JSON-safe, size-capped, redacted rendering of task values.

Task arguments and results can be anything pickle or a custom serialiser allows. What goes
into a Langfuse observation must be JSON, must not carry secrets and must stay small, and
rendering it must never raise: a value whose ``__repr__`` raises is shown as a placeholder.

- Mappings, sequences, sets, dataclasses and pydantic models are walked (depth-limited).
- Values under keys that match the redaction pattern become ``"[REDACTED]"``.
- bytes become ``"<bytes len=N>"`` (the content is not guessed at), datetimes ISO 8601.
- The encoded JSON is capped at ``max_bytes``: an over-long rendering is replaced by a
  truncated string preview and a marker saying how large the original was.
- Hostile values never escape: lone surrogates become U+FFFD (the result is valid UTF-8),
  containers that contain themselves render ``"<recursive>"``, a walk visits at most
  ``_MAX_NODES`` values, ints too large for JSON readers become text, and any exception a
  value raises (``__repr__``, ``__iter__``, ``__eq__``, ``__hash__``, ``items``, ...) turns
  that value into a placeholder naming its type.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import itertools
import json
import re
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

REDACTED = "[REDACTED]"
_MAX_DEPTH = 8
_MAX_ITEMS = 200
_MAX_NODES = 20_000
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SAFE_INT = 2**63


def clean_text(text: str | None) -> str | None:
    """``text`` with lone surrogates replaced by U+FFFD, so it encodes as UTF-8."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def render(value: Any, *, redact: re.Pattern[str], max_bytes: int) -> Any:
    """Return a JSON-safe version of ``value``: redacted, and capped at ``max_bytes`` of JSON."""
    safe, encoded = _walk(value, redact)
    return json.loads(_capped(encoded, max_bytes)) if _too_big(encoded, max_bytes) else safe


def render_attribute(value: Any, *, redact: re.Pattern[str], max_bytes: int) -> str:
    """The same rendering, as the Langfuse SDK would write it into a span attribute.

    JSON text, except that a string stays itself (the SDK sends strings raw). Handing the SDK
    text instead of Python objects spares it a second serialisation and a recursive walk
    looking for media in every nested value.
    """
    safe, encoded = _walk(value, redact, copy=False)
    if _too_big(encoded, max_bytes):
        return _capped(encoded, max_bytes)
    return safe if isinstance(safe, str) else encoded


def _walk(value: Any, redact: re.Pattern[str], copy: bool = True) -> tuple[Any, str]:
    """(JSON-safe value, its JSON text); never raises. Unless ``copy``, a value that is
    already plain JSON (:func:`_is_plain`) is encoded as it is, without the walk's copy."""
    try:
        plain = not copy and _is_plain(value, redact)
        safe = value if plain else _Walker(redact).safe(value, 0)
        encoded = _ENCODER.encode(safe)
        cleaned = clean_text(encoded)
        if cleaned is not encoded:
            return json.loads(cleaned or "null"), cleaned or "null"
        return safe, encoded
    except Exception as exc:  # a last resort: the walk itself is guarded value by value
        placeholder = f"<{type(value).__name__} (could not render: {type(exc).__name__})>"
        return placeholder, json.dumps(placeholder)


def _too_big(encoded: str, max_bytes: int) -> bool:
    return len(encoded.encode("utf-8")) > max_bytes


def _capped(encoded: str, max_bytes: int) -> str:
    """A bounded preview of an over-long rendering, saying how large it was (JSON text).

    The preview is JSON-escaped inside the marker (quotes and backslashes double), so it is
    shortened until the whole marker fits ``max_bytes``.
    """
    raw = encoded.encode("utf-8")
    budget = max(0, max_bytes - 120)
    while True:
        preview = raw[:budget].decode("utf-8", "ignore")
        capped = {"truncated": True, "original_bytes": len(raw), "preview": preview}
        text = json.dumps(capped, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
        if size <= max_bytes or budget == 0:
            return text
        budget = max(0, budget - (size - max_bytes) - 8)


# json.dumps(..., ensure_ascii=False, separators=...) builds an encoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_PLAIN_LEAVES = frozenset((str, bool, type(None)))
_INF = float("inf")


def _is_plain(value: Any, redact: re.Pattern[str]) -> bool:
    """True when the walk would return an equal copy of ``value``: only dicts with str keys
    that are not redacted, lists, tuples, str, bool, None, ints within the JSON-safe range and
    finite floats (exactly these types, no subclasses), within every limit of the walk."""
    budget = [_MAX_NODES]
    return _plain(value, 0, redact, _clear_keys.setdefault(redact, set()), budget)


_clear_keys: dict[re.Pattern[str], set[str]] = {}  # keys each pattern was found not to match


def _plain(value: Any, depth: int, redact: re.Pattern[str], clear: set[str],
           budget: list[int]) -> bool:
    budget[0] -= 1
    if budget[0] < 0:
        return False
    kind = type(value)
    if kind in _PLAIN_LEAVES:
        return True
    if kind is int:
        return -_JSON_SAFE_INT < value < _JSON_SAFE_INT
    if kind is float:
        return value == value and value not in (_INF, -_INF)
    if depth >= _MAX_DEPTH or (kind is not dict and kind is not list and kind is not tuple):
        return False
    if len(value) > _MAX_ITEMS:
        return False
    if kind is not dict:
        for item in value:  # noqa: SIM110 - a loop, not all(<generator>): runs every task
            if not _plain(item, depth + 1, redact, clear, budget):
                return False
        return True
    for key, item in value.items():
        if key not in clear:
            if type(key) is not str or redact.search(key):
                return False
            if len(clear) < 4096:
                clear.add(key)
        if not _plain(item, depth + 1, redact, clear, budget):
            return False
    return True


class _Walker:
    """One rendering: the redaction pattern, the node budget and the containers on the path."""

    def __init__(self, redact: re.Pattern[str]) -> None:
        self.redact = redact
        self.nodes = 0
        self.path: set[int] = set()

    def safe(self, value: Any, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            return "<more values left out>"
        try:
            return self._safe(value, depth)
        except Exception as exc:
            return f"<{_type_name(value)} (render failed: {type(exc).__name__})>"

    def _safe(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value) if -_JSON_SAFE_INT < value < _JSON_SAFE_INT else _big_int(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, float):
            finite = value == value and value not in (float("inf"), float("-inf"))
            return float(value) if finite else str(value)
        if depth >= _MAX_DEPTH:
            return f"<{_type_name(value)}: nested too deep>"
        scalar = _scalar(value)
        if scalar is not _NOT_SCALAR:
            return scalar
        if id(value) in self.path:
            return f"<recursive {_type_name(value)}>"
        self.path.add(id(value))
        try:
            return self._container(value, depth)
        finally:
            self.path.discard(id(value))

    def _container(self, value: Any, depth: int) -> Any:
        if isinstance(value, Mapping):
            return self._mapping(value, depth)
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(itertools.islice(iter(value), _MAX_ITEMS + 1))
            if isinstance(value, (set, frozenset)):
                items.sort(key=_repr)
            out = [self.safe(item, depth + 1) for item in items[:_MAX_ITEMS]]
            if len(items) > _MAX_ITEMS:
                out.append(f"<{len(value) - _MAX_ITEMS} more items>")
            return out
        structured = _structured(value)
        if structured is not None:
            return self._mapping(structured, depth)
        return _repr(value)

    def _mapping(self, value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if index >= _MAX_ITEMS:
                out["<more>"] = f"{len(value) - _MAX_ITEMS} more keys"
                break
            name = str(key) if isinstance(key, str) else _repr(key)
            out[name] = REDACTED if self.redact.search(name) else self.safe(item, depth + 1)
        return out


def _big_int(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # past sys.get_int_max_str_digits()
        return f"<int of {value.bit_length()} bits>"


def _type_name(value: Any) -> str:
    try:
        return str(type(value).__name__)
    except Exception:
        return "object"


_NOT_SCALAR = object()


def _scalar(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<bytes len={len(value)}>"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return _safe_plain(value.value)
    if isinstance(value, (decimal.Decimal, uuid.UUID, PurePath)):
        return str(value)
    return _NOT_SCALAR


def _safe_plain(value: Any) -> Any:
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float and value == value and value not in (float("inf"), float("-inf")):
        return value
    return _repr(value)


def _structured(value: Any) -> Mapping[str, Any] | None:
    """Fields of a dataclass or pydantic model, or None for anything else."""
    try:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        dump = getattr(value, "model_dump", None)
        if callable(dump):
            dumped = dump()
            return dumped if isinstance(dumped, Mapping) else None
    except Exception:  # a broken model renders as its repr, never raises
        return None
    return None


def _repr(value: Any) -> str:
    try:
        text = str(repr(value))
    except Exception as exc:  # objects whose __repr__ raises still render
        return f"<{_type_name(value)} (repr failed: {type(exc).__name__})>"
    return text if len(text) <= 2000 else text[:2000] + "…"

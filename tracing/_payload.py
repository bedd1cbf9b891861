"""Input/output capture: a JSON-safe, size-capped, redacted rendering of task values.

Task arguments and results can be anything pickle or a custom serialiser allows. What goes
into a Langfuse observation must be JSON, must not carry secrets and must stay small, and
rendering it must never raise: a value whose ``__repr__`` raises is shown as a placeholder.

- Mappings, sequences, sets, dataclasses and pydantic models are walked (depth-limited).
- Values under keys that match the redaction pattern become ``"[REDACTED]"``.
- bytes become ``"<bytes len=N>"`` (the content is not guessed at), datetimes ISO 8601.
- The encoded JSON is capped at ``max_bytes``: an over-long rendering is replaced by a
  truncated string preview and a marker saying how large the original was.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import re
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

REDACTED = "[REDACTED]"
_MAX_DEPTH = 8
_MAX_ITEMS = 200


def render(value: Any, *, redact: re.Pattern[str], max_bytes: int) -> Any:
    """Return a JSON-safe version of ``value``: redacted, and capped at ``max_bytes`` of JSON."""
    safe = _safe(value, redact, 0)
    encoded = json.dumps(safe, ensure_ascii=False, separators=(",", ":"))
    return json.loads(_capped(encoded, max_bytes)) if _too_big(encoded, max_bytes) else safe


def render_attribute(value: Any, *, redact: re.Pattern[str], max_bytes: int) -> str:
    """The same rendering, as the Langfuse SDK would write it into a span attribute.

    JSON text, except that a string stays itself (the SDK sends strings raw). Handing the SDK
    text instead of Python objects spares it a second serialisation and a recursive walk
    looking for media in every nested value.
    """
    safe = _safe(value, redact, 0)
    encoded = json.dumps(safe, ensure_ascii=False, separators=(",", ":"))
    if _too_big(encoded, max_bytes):
        return _capped(encoded, max_bytes)
    return safe if isinstance(safe, str) else encoded


def _too_big(encoded: str, max_bytes: int) -> bool:
    return len(encoded.encode("utf-8")) > max_bytes


def _capped(encoded: str, max_bytes: int) -> str:
    """A bounded preview of an over-long rendering, saying how large it was (JSON text)."""
    raw = encoded.encode("utf-8")
    preview = raw[: max(0, max_bytes - 120)].decode("utf-8", "ignore")
    capped = {"truncated": True, "original_bytes": len(raw), "preview": preview}
    return json.dumps(capped, ensure_ascii=False, separators=(",", ":"))


def _safe(value: Any, redact: re.Pattern[str], depth: int) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        finite = value == value and value not in (float("inf"), float("-inf"))
        return value if finite else str(value)
    if depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}: nested too deep>"
    scalar = _scalar(value)
    if scalar is not _NOT_SCALAR:
        return scalar
    if isinstance(value, Mapping):
        return _mapping(value, redact, depth)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        out = [_safe(item, redact, depth + 1) for item in list(items)[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            out.append(f"<{len(value) - _MAX_ITEMS} more items>")
        return out
    structured = _structured(value)
    if structured is not None:
        return _mapping(structured, redact, depth)
    return _repr(value)


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
    return value if isinstance(value, (bool, int, float, str)) or value is None else _repr(value)


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


def _mapping(value: Mapping[Any, Any], redact: re.Pattern[str], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for index, (key, item) in enumerate(value.items()):
        if index >= _MAX_ITEMS:
            out["<more>"] = f"{len(value) - _MAX_ITEMS} more keys"
            break
        name = key if isinstance(key, str) else _repr(key)
        out[name] = REDACTED if redact.search(name) else _safe(item, redact, depth + 1)
    return out


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # objects whose __repr__ raises still render
        return f"<{type(value).__name__} (repr failed: {type(exc).__name__})>"
    return text if len(text) <= 2000 else text[:2000] + "…"

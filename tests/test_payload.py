"""Input/output rendering: JSON-safe, redacted, capped, and never raising."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import uuid
from decimal import Decimal

from tracing._config import DEFAULT_REDACT_PATTERN
from tracing._payload import REDACTED, render

REDACT = re.compile(DEFAULT_REDACT_PATTERN)


def safe(value: object, max_bytes: int = 10_000) -> object:
    rendered = render(value, redact=REDACT, max_bytes=max_bytes)
    json.dumps(rendered)  # must always be JSON
    return rendered


@dataclasses.dataclass
class Point:
    x: int
    api_key: str


class Model:
    """Quacks like a pydantic model."""

    def model_dump(self) -> dict[str, object]:
        return {"name": "m", "token": "t0k3n"}


class Hostile:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_common_types_render_as_json():
    """Dataclasses, models, bytes, sets, datetimes, decimals and UUIDs become JSON."""
    value = {
        "point": Point(1, "k"), "model": Model(), "blob": b"\x00\x01",
        "tags": {"b", "a"}, "when": dt.datetime(2026, 1, 2, 3, 4, 5),
        "price": Decimal("1.50"), "id": uuid.UUID(int=1), "nan": float("nan"),
    }
    out = safe(value)
    assert out["point"] == {"x": 1, "api_key": REDACTED}
    assert out["model"] == {"name": "m", "token": REDACTED}
    assert out["blob"] == "<bytes len=2>" and out["tags"] == ["a", "b"]
    assert out["when"] == "2026-01-02T03:04:05" and out["price"] == "1.50"
    assert out["nan"] == "nan"


def test_object_whose_repr_raises():
    """An object whose __repr__ raises renders as a placeholder, never an exception."""
    assert safe([Hostile()]) == ["<Hostile (repr failed: RuntimeError)>"]


def test_secret_keys_redacted_at_any_depth():
    """Values under secret-looking keys are redacted however deep."""
    out = safe({"user": {"Password": "p", "Authorization": "Bearer x", "name": "n"}})
    assert out == {"user": {"Password": REDACTED, "Authorization": REDACTED, "name": "n"}}


def test_cap_keeps_size_under_limit():
    """A rendering over the cap becomes a bounded preview saying how big it was."""
    out = safe({"text": "x" * 50_000}, max_bytes=1000)
    assert out["truncated"] is True and out["original_bytes"] > 50_000
    assert len(json.dumps(out)) <= 1000


def test_deep_and_wide_structures_are_bounded():
    """Very deep or very long structures are cut, not walked forever."""
    deep: list[object] = []
    cursor = deep
    for _ in range(50):
        nxt: list[object] = []
        cursor.append(nxt)
        cursor = nxt
    assert "nested too deep" in json.dumps(safe(deep))
    assert safe(list(range(1000)))[-1] == "<800 more items>"


def test_attribute_text_matches_the_rendering():
    """The attribute form is the rendering as JSON text; a string stays a raw string."""
    from tracing._payload import render_attribute

    value = {"args": [1, "x"], "password": "p"}
    text = render_attribute(value, redact=REDACT, max_bytes=10_000)
    assert json.loads(text) == safe(value)
    assert render_attribute("plain text", redact=REDACT, max_bytes=10_000) == "plain text"
    capped = json.loads(render_attribute("y" * 5000, redact=REDACT, max_bytes=1000))
    assert capped["truncated"] is True

"""Input/output rendering: JSON-safe, redacted, capped, and never raising."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import uuid
from decimal import Decimal

from tracing._config import DEFAULT_REDACT_PATTERN
from tracing.instrumentation._payload import REDACTED, render

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
    from tracing.instrumentation._payload import render_attribute

    value = {"args": [1, "x"], "password": "p"}
    text = render_attribute(value, redact=REDACT, max_bytes=10_000)
    assert json.loads(text) == safe(value)
    assert render_attribute("plain text", redact=REDACT, max_bytes=10_000) == "plain text"
    capped = json.loads(render_attribute("y" * 5000, redact=REDACT, max_bytes=1000))
    assert capped["truncated"] is True


# -- hostile values: any value renders to valid UTF-8 JSON within the cap, never raising -------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tracing.instrumentation._payload import clean_text, render_attribute  # noqa: E402


class Raising:
    """An object every dunder of which raises."""

    def __repr__(self) -> str:
        raise RuntimeError("repr")

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("iter")


class RaisingList(list):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("iter")


class RaisingDict(dict):  # type: ignore[type-arg]
    def items(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("items")


class BadRepr:
    """Hashable, but its __repr__ raises: a set of these cannot be sorted by repr."""

    def __repr__(self) -> str:
        raise RuntimeError("repr")


def self_referencing() -> list[object]:
    items: list[object] = []
    items.append(items)
    nested: dict[str, object] = {"me": None}
    nested["me"] = nested
    items.append(nested)
    return items


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                   exclude_categories=())),
    st.binary(), st.builds(Raising), st.builds(lambda: 2**70000), st.just("\udc80 lone"),
    st.builds(self_referencing), st.builds(lambda: RaisingList([1])),
    st.builds(lambda: RaisingDict(a=1)), st.builds(lambda: {BadRepr(), BadRepr()}),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.tuples(children, children),
        st.dictionaries(st.text(max_size=5), children, max_size=6),
        st.frozensets(st.integers(), max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(values, st.integers(min_value=256, max_value=4096))
def test_any_value_renders_to_utf8_json_within_the_cap(value, cap):
    """Whatever a task takes or returns, the rendering is valid UTF-8 JSON within the cap."""
    text = render_attribute(value, redact=REDACT, max_bytes=cap)
    encoded = text.encode("utf-8")  # raises on a lone surrogate
    assert len(encoded) <= cap + 200
    json.loads(json.dumps(text))
    rendered = render(value, redact=REDACT, max_bytes=cap)
    json.dumps(rendered, ensure_ascii=False).encode("utf-8")


def test_hostile_shapes_render_as_placeholders():
    """Raising dunders, recursion, huge ints and lone surrogates each get a readable stand-in."""
    rendered = safe({"h": Raising(), "loop": self_referencing(), "big": 2**70000,
                     "s": "a\udc80b", "set": {BadRepr(), BadRepr()},
                     "l": RaisingList([1]), "d": RaisingDict(a=1)})
    assert isinstance(rendered, dict)
    assert "repr failed" in rendered["h"]
    assert rendered["loop"][0] == "<recursive list>"
    assert rendered["big"].startswith("<int of 70001 bits")
    assert rendered["s"] == "a\ufffdb"
    assert "render failed" in str(rendered["l"]) and "render failed" in str(rendered["d"])
    assert len(rendered["set"]) == 2 and all("repr failed" in x for x in rendered["set"])
    assert clean_text("ok\ud800") == "ok\ufffd"


def test_a_wide_self_similar_value_stays_bounded():
    """A list holding itself 200 times at every level renders in bounded work."""
    wide: list[object] = []
    wide.extend([wide] * 200)
    outer = [[list(wide) for _ in range(50)] for _ in range(50)]
    text = render_attribute(outer, redact=REDACT, max_bytes=4096)
    assert len(text.encode("utf-8")) <= 4096 + 200


plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                             exclude_categories=()), max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.tuples(children, children),
        st.dictionaries(st.sampled_from(["a", "password", "b", "token", "\udc80"]), children,
                        max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(plain_values, st.integers(min_value=64, max_value=4096))
def test_plain_values_skip_the_walk_with_the_same_text(value, cap):
    """A value that is already plain JSON is rendered without the walk's copy, to exactly
    the text the walk gives (redaction, caps, surrogates, big ints and NaN included)."""
    from tracing.instrumentation import _payload

    fast = render_attribute(value, redact=REDACT, max_bytes=cap)
    original = _payload._is_plain
    _payload._is_plain = lambda value, redact: False  # type: ignore[assignment]
    try:
        walked = render_attribute(value, redact=REDACT, max_bytes=cap)
    finally:
        _payload._is_plain = original
    assert fast == walked


def test_deep_or_self_containing_values_are_not_plain():
    """Depth, width and cycles send a value through the walk (which bounds them)."""
    from tracing.instrumentation._payload import _is_plain

    loop: list[object] = []
    loop.append(loop)
    deep: object = 1
    for _ in range(12):
        deep = [deep]
    assert not _is_plain(loop, REDACT) and not _is_plain(deep, REDACT)
    assert not _is_plain(list(range(500)), REDACT)
    assert _is_plain({"args": [1, 2.5, "x", None, True], "kwargs": {}}, REDACT)

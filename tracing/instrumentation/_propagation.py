"""Producer → task propagation: trace attributes and W3C ``traceparent`` in message headers.

A producer wraps ``.delay()`` / ``apply_async()`` / ``send_task()`` in
:func:`trace_attributes`; a ``before_task_publish`` handler writes what is in force into the
message headers: ``traceparent`` (and ``tracestate``) of the current OpenTelemetry/Langfuse
context, so a producer inside an observation gets the task as its child, and
``celery_langfuse`` (a JSON object: user_id, session_id, tags, metadata, trace_name,
version, join) and ``celery_langfuse_sent_at`` (the publish time, epoch seconds as text, from
which the worker computes how long the message waited in the queue).

A chord callback's parent is pinned by the process that sent the chord (``_canvas``), in one
of two ways; either is used instead of the current context for the callback's own publish
only, so a retry of the callback hangs under the attempt before, as every retry does:

* ``celery_langfuse_callback`` on each member's message: a pin ``<callback task id>
  <traceparent>`` (the id, one space, the 55-character ``traceparent``), or a list of such
  pins when the message leads to several chords' callbacks (a member replaced by a chord:
  its members fire the inner chord's callback, which fires the outer one). The worker
  running the member keeps them in the task's context (:data:`CALLBACK_KEY`); when the
  member's completion publishes the message with a pinned task id, it goes under that
  ``traceparent``. A member's retry carries them on (``Task.retry`` copies the request's
  headers), and so does a member's replacement, or a pinned callback that fires another
  pinned chord (the handler puts each pin on a message that fires its chord,
  :func:`fires_chord`). Per message, so nothing is copied per member: Celery deep-copies a
  callback's options into every member.
* ``celery_langfuse_parent`` (a ``traceparent``) in the callback signature's own ``headers``
  option, so in the callback message itself, dropped when used: for a callback published
  elsewhere than in a member's worker (a ``chord_unlock`` backend, a chain's last link, an
  eager chord).

Where the headers go, and why only at the top level: Celery (5.x, protocol 2) merges custom
headers flat into the message headers; the worker's ``Context`` then takes as
``request.headers`` every message header that is not one of Celery's own, *unless* the message
has a key named ``headers``, in which case ``request.headers`` is that dict alone — and
``Task.retry`` republishes exactly ``request.headers``. A nested ``headers`` dict written by
us would therefore hide the producer's own custom headers from the task and drop them from
every retry. So ours are written at the top level only (protocol 1 hands the worker the whole
header dict as ``request.headers``, so they are found there too), and a task sees the headers
it was sent plus ours (``traceparent``, ``tracestate``, ``celery_langfuse``,
``celery_langfuse_sent_at``). Reading still looks at both levels: messages published by older
versions carry them nested.
``send_task`` of a task the producer does not have registered goes through the same signal,
so it is covered too.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import signals
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tracing import _sdk

__all__ = ["TraceAttributes", "read_headers", "trace_attributes"]

logger = logging.getLogger("celery_langfuse")

ATTRIBUTES_HEADER = "celery_langfuse"
SENT_AT_HEADER = "celery_langfuse_sent_at"
PARENT_HEADER = "celery_langfuse_parent"
CALLBACK_HEADER = "celery_langfuse_callback"
CALLBACK_KEY = otel_context.create_key("celery_langfuse.chord_callback")  # Pins
_W3C_KEYS = ("traceparent", "tracestate")
Pin = tuple[str, str]  # a chord callback's (task id, traceparent)
Pins = tuple[Pin, ...]
_propagator = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TraceAttributes:
    """Trace-level attributes that a producer attaches to the tasks it sends."""

    user_id: str | None = None
    session_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    trace_name: str | None = None
    version: str | None = None
    join: str | None = None  # parent / link / off: how the tasks sent join this trace

    def merged(self, other: TraceAttributes) -> TraceAttributes:
        """Values of ``other`` win; tags and metadata are combined."""
        return TraceAttributes(
            user_id=other.user_id or self.user_id,
            session_id=other.session_id or self.session_id,
            tags=tuple(dict.fromkeys(self.tags + other.tags)),
            metadata={**self.metadata, **other.metadata},
            trace_name=other.trace_name or self.trace_name,
            version=other.version or self.version,
            join=other.join or self.join,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return json.dumps({k: v for k, v in data.items() if v}, default=str)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TraceAttributes:
        tags = data.get("tags") or ()
        metadata = data.get("metadata") or {}
        return cls(
            user_id=_text(data.get("user_id")),
            session_id=_text(data.get("session_id")),
            tags=tuple(dict.fromkeys(
                str(t) for t in (tags if isinstance(tags, (list, tuple)) else [tags]))),
            metadata=dict(metadata) if isinstance(metadata, Mapping) else {"value": metadata},
            trace_name=_text(data.get("trace_name")),
            version=_text(data.get("version")),
            join=_text(data.get("join")),
        )


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


_current: contextvars.ContextVar[TraceAttributes | None] = contextvars.ContextVar(
    "celery_langfuse_trace_attributes", default=None
)


@contextlib.contextmanager
def trace_attributes(
    *,
    user_id: str | None = None,
    session_id: str | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    trace_name: str | None = None,
    version: str | None = None,
    join: str | None = None,
) -> Iterator[TraceAttributes]:
    """Attach trace attributes to every task sent inside the block (nesting combines them).

    The W3C ``traceparent`` of the current Langfuse/OpenTelemetry context is attached too,
    so a producer that is inside an observation gets the task as its child; ``join`` says
    how the tasks join it (``parent``, ``link`` or ``off``, see ``task_options``).
    """
    if join is not None and join not in ("parent", "link", "off"):
        raise ValueError(f"trace_attributes(join={join!r}): expected parent, link or off")
    connect_publish_handler()
    outer = _current.get() or TraceAttributes()
    attrs = outer.merged(TraceAttributes(
        user_id, session_id, tuple(tags), dict(metadata or {}), trace_name, version, join))
    token = _current.set(attrs)
    try:
        yield attrs
    finally:
        _current.reset(token)


def current_attributes() -> TraceAttributes | None:
    """The trace attributes in force here (``trace_attributes`` blocks), if any."""
    return _current.get()


def connect_publish_handler() -> None:
    """Connect the ``before_task_publish`` handler and wrap the canvas sends (idempotent)."""
    from tracing.instrumentation import _canvas  # it builds on this module

    signals.before_task_publish.connect(_on_before_publish, weak=False,
                                        dispatch_uid="celery_langfuse.publish")
    _canvas.install()


def disconnect_publish_handler() -> None:
    from tracing.instrumentation import _canvas

    signals.before_task_publish.disconnect(dispatch_uid="celery_langfuse.publish")
    _canvas.uninstall()


_publish_observation = False
_public_key: str | None = None
# While a canvas's members are sent: their chord callback's pin, and their parent (the
# canvas node's span and its traceparent).
_Members = tuple[Pin | None, tuple[Any, str] | None]
_members: contextvars.ContextVar[_Members | None] = contextvars.ContextVar(
    "celery_langfuse_members", default=None)


class MembersSent:
    """A block in which every message published (a canvas's members) carries the parent of
    its chord callback, ``callback`` = (callback task id, traceparent), as
    ``celery_langfuse_callback`` (module docstring); and while ``parent`` = (span,
    traceparent) is the current span, its ``traceparent`` is written as it is, not rebuilt
    from the context for each member (an eager member's own span is current in its body).
    A class, not a generator: it is entered once per canvas sent."""

    __slots__ = ("_token", "_value")

    def __init__(self, callback: Pin | None, parent: tuple[Any, str] | None) -> None:
        self._value = (callback, parent)
        self._token: contextvars.Token[_Members | None] | None = None

    def __enter__(self) -> None:
        self._token = _members.set(self._value)

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _members.reset(self._token)


def record_publishes(enabled: bool, public_key: str | None = None) -> None:
    """Whether a producer inside an observation records an ``enqueue <task>`` child, with
    the Langfuse client of ``public_key`` (the configured one)."""
    global _publish_observation, _public_key
    _publish_observation = enabled
    _public_key = public_key


def _on_before_publish(
    sender: Any = None, headers: MutableMapping[str, Any] | None = None,
    routing_key: str | None = None, exchange: Any = None, body: Any = None, **_: Any,
) -> None:
    try:
        if headers is None:
            return
        pinned = headers.pop(PARENT_HEADER, None)
        carried: Pins = ()
        pins: Any = otel_context.get_value(CALLBACK_KEY)
        if pins:  # in a chord member's worker: its completion sends the callback
            pinned, carried = _use_pins(pins, headers.get("id"), body, pinned)
        members = _members.get()
        if members is not None:  # a canvas's members, being sent
            pin, parent = members
            if pin is not None:
                carried = (*(p for p in carried if p[0] != pin[0]), pin) if carried else (pin,)
            if pinned is None and parent is not None and (
                    otel_trace.get_current_span() is parent[0]):
                pinned = parent[1]
        if carried:
            headers[CALLBACK_HEADER] = _pins_value(carried)
        if pinned is not None:
            inject(headers, traceparent=str(pinned))
        elif _publish_observation and otel_trace.get_current_span().is_recording():
            _inject_under_enqueue(str(sender), headers, routing_key, exchange)
        else:
            inject(headers)
    except Exception:  # tracing never breaks a publish
        logger.exception("celery-langfuse: could not add trace headers to task %s", sender)


def _use_pins(pins: Pins, task_id: Any, body: Any, pinned: Any) -> tuple[Any, Pins]:
    """The parent a pin gives the message ``task_id`` (a pinned callback; a parent the
    message pinned itself comes first), and the pins it carries on (those of the chords
    it fires)."""
    carried = []
    for pin in pins:
        if task_id == pin[0]:
            pinned = pin[1] if pinned is None else pinned
        elif fires_chord(body, pin[0]):  # a member's replacement, or a callback, fires it
            carried.append(pin)
    return pinned, tuple(carried)


def _pins_value(pins: Pins) -> str | list[str]:
    """The ``celery_langfuse_callback`` header of ``pins``: one pin as text, several as a
    list of them."""
    if len(pins) == 1:
        return f"{pins[0][0]} {pins[0][1]}"
    return [f"{task_id} {traceparent}" for task_id, traceparent in pins]


def fires_chord(body: Any, callback_id: str) -> bool:
    """Whether a message (a protocol 2 body: args, kwargs, embed) leads to the chord callback
    ``callback_id``: it carries that chord, or a chord whose callback does (a member replaced
    by a group: Celery makes it a chord whose callback carries the outer one), or it starts a
    chain whose last link does. A member's ``Task.replace`` sends such a message; the pin
    goes with it."""
    embed = body[2] if type(body) in (tuple, list) and len(body) == 3 else None
    if not isinstance(embed, dict):
        return False
    chords = [embed.get("chord")]
    for link in embed.get("chain") or ():
        options = link.get("options") if isinstance(link, dict) else None
        chords.append(options.get("chord") if isinstance(options, dict) else None)
    for chord in chords:
        for _ in range(8):  # chords inside chords' callbacks, a few levels deep
            options = chord.get("options") if isinstance(chord, dict) else None
            if not isinstance(options, dict):
                break
            if options.get("task_id") == callback_id:
                return True
            chord = options.get("chord")
    return False


def _inject_under_enqueue(
    task: str, headers: MutableMapping[str, Any], routing_key: str | None, exchange: Any
) -> None:
    """An ``enqueue <task>`` observation under the producer's, and the task under it."""
    from langfuse import get_client

    metadata = {"task_id": headers.get("id"), "task_name": task, "routing_key": routing_key,
                "exchange": str(exchange) if exchange is not None else None}
    enqueue = get_client(public_key=_public_key).start_observation(
        name=f"enqueue {task}", metadata=metadata)
    try:
        with otel_trace.use_span(_sdk.otel_span(enqueue), end_on_exit=False):
            inject(headers)
    finally:
        enqueue.end()


def inject(headers: MutableMapping[str, Any], traceparent: str | None = None) -> None:
    """Write the current trace context (or ``traceparent``) and attributes into the message's
    top-level headers (never a nested ``headers`` dict: see the module docstring)."""
    # The publish time and the W3C context overwrite what the message has: the observation
    # publishing it is its parent, even when it copies an older message's headers
    # (``Task.retry`` copies the request's), so attempt n+1 hangs under attempt n, a chain
    # link under the link before. The attributes a message already has are kept.
    headers[SENT_AT_HEADER] = f"{time.time():.6f}"
    if traceparent:
        headers["traceparent"] = traceparent
    else:
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        headers.update(carrier)
    attrs = _current.get()
    if attrs is not None and ATTRIBUTES_HEADER not in headers:
        headers[ATTRIBUTES_HEADER] = attrs.to_json()


@dataclass(frozen=True)
class IncomingContext:
    """What a task message carried: the W3C carrier and the producer's trace attributes."""

    carrier: dict[str, str]
    attributes: TraceAttributes
    sent_at: float | None = None
    callbacks: Pins = ()  # a chord member's: its chords' callbacks' (id, parent)


def read_headers(request: Any) -> IncomingContext:
    """Read ``traceparent`` and trace attributes from a task request, at either header level."""
    sources: list[Mapping[str, Any]] = []
    for candidate in (getattr(request, "headers", None), getattr(request, "__dict__", None)):
        if isinstance(candidate, Mapping):
            sources.append(candidate)
            inner = candidate.get("headers")
            if isinstance(inner, Mapping):
                sources.append(inner)
    carrier: dict[str, str] = {}
    raw_attrs: Any = None
    sent_at: Any = None
    callback: Any = None
    for source in sources:
        for key in _W3C_KEYS:
            if key not in carrier and isinstance(source.get(key), str):
                carrier[key] = source[key]
        if raw_attrs is None:
            raw_attrs = source.get(ATTRIBUTES_HEADER)
        if sent_at is None:
            sent_at = source.get(SENT_AT_HEADER)
        if callback is None:
            callback = source.get(CALLBACK_HEADER)
    return IncomingContext(carrier, _parse_attributes(raw_attrs), _seconds(sent_at),
                           () if callback is None else _pins(callback))


def _pins(value: Any) -> Pins:
    """The pins of a ``celery_langfuse_callback`` header (text, or a list of texts, which a
    serializer may hand over as a tuple); what is not a pin is left out."""
    texts = [value] if type(value) is str else value if isinstance(value, (list, tuple)) else ()
    pins = []
    for text in texts:
        task_id, _, traceparent = text.rpartition(" ") if type(text) is str else ("", "", "")
        if task_id and len(traceparent) == 55 and traceparent.count("-") == 3:
            pins.append((task_id, traceparent))
    return tuple(pins)


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _parse_attributes(raw: Any) -> TraceAttributes:
    if raw is None:
        return TraceAttributes()
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        if isinstance(data, Mapping):
            return TraceAttributes.from_mapping(data)
        return TraceAttributes()
    except ValueError:
        logger.warning("celery-langfuse: ignoring unreadable %s header %r", ATTRIBUTES_HEADER, raw)
        return TraceAttributes()

"""Canvases as Langfuse shows them: a group or a chord is ONE trace, its members siblings.

Celery gives each member of a group (or chord header) sent from outside a task a ``root_id``
of its own, so by the task rule alone (``_task_span``) each member would be a trace of its
own. Instead, the process that sends the canvas decides where its members hang, when it
publishes them (``group.apply_async`` / ``group.apply``, which a chord's ``run`` and
``apply`` go through; ``chord.run`` and ``chord.apply`` too, for the callback; wrapped by
:func:`install`):

=============================================  ================================================
the canvas is sent                             its members (and a chord's callback) hang under
=============================================  ================================================
from inside an observation (a producer's, or   that observation: siblings, no extra root
a task's: a chord sent by a chain link)
from outside any trace                         the **canvas root**: a parentless observation
                                               written by the sender, ids derived from the
                                               group id (below), name ``chord: a ×4 → b`` /
                                               ``group: a ×3`` (or the ``trace_name`` of
                                               ``trace_attributes``), input the members,
                                               output the ids sent; type ``chain`` for a
                                               chord, ``span`` for a group
while another canvas is being sent (a chord    a canvas node of its own under the outer one
inside a group)                                (same rule, one level down)
as a chord's callback (``chain(group, group)``  a canvas node of its own under the chord's
is a chord whose callback is the 2nd group)    node, sent by the member's worker that fires it
=============================================  ================================================

**Ids any process can derive**: trace id ``trace_id_for(group_id)`` and observation id
``root_observation_id_for(group_id)`` (``_task_span``), the group id being the id of the
``GroupResult`` (for a chord, ``result.parent.id``). A group id is a fresh uuid, never a task
id, so it names no task's trace. A sender that passes ``root_id=`` to ``apply_async`` (the
old way to keep a chord in one trace) gets ``trace_id_for(root_id)`` instead: the same trace
id as before, now with the members as siblings under the canvas root.

**The chord callback hangs under the canvas root** (a sibling of the members), not under
the member whose completion happened to fire it: in Langfuse the root's children then read
as the canvas (the members, then the callback), the callback's time is not counted inside a
member that did not do that work, and where it hangs does not depend on which member ended
last. The callback is published by that member's worker, inside the member's observation,
so the sender pins the callback's parent (``_propagation`` uses the pin for the callback's
own publish only, so a retry of the callback hangs under the attempt before, as every retry
does). Where the pin travels:

* a chord of task signatures (members and callback) on a backend whose members' workers
  publish the callback (Redis, and every backend with its own chord join): a
  ``celery_langfuse_callback`` header on each member's message, written by the publish
  handler while the members are sent (``MembersSent``); nothing is added to the
  callback signature, which Celery deep-copies into every member (a third of a chord
  send's tracing cost, ``bench.publish``);
* else (a chain or canvas among the members, whose last link sends the callback; a callback
  that is a canvas, whose own members are the messages sent; a backend that polls with
  ``celery.chord_unlock``; an eager chord; a callback without a frozen id): a
  ``celery_langfuse_parent`` header in the callback signature's options, which every member
  message carries.

**Durable at the sender**: the root is one span record appended to the producer's spool
(``_producer``: the worker's spool in a worker, else this process's shipper thread, a last
bounded attempt at exit, then the hand-off store), written when the members are published
(start and end: the publish). It is written only when this process has Langfuse keys (a
shipper could not send it otherwise); without them the members keep the task rule and one
warning says so. Cost at publish: ``python -m bench.publish`` (canvas row); nothing is added
to a plain task's send (only ``group.apply_async`` is wrapped).
"""

# ruff: noqa: RUF002  (the canvas names Langfuse shows use the multiplication sign)
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from celery import current_app
from celery.backends.base import Backend
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tracing.instrumentation import _producer
from tracing.instrumentation._canvas_span import canvas_frame, is_task
from tracing.instrumentation._propagation import PARENT_HEADER, MembersSent
from tracing.instrumentation._task_span import root_observation_id_for, trace_id_for

__all__ = ["EagerChain", "eager_chain", "install", "publish", "uninstall"]

logger = logging.getLogger("celery_langfuse")


@dataclass
class Node:
    """A canvas being published by this process, with a node of its own in the trace."""

    kind: str  # "group" / "chord"
    group_id: str
    members: list[Any]
    callback: Any
    trace_id: int
    span_id: int
    parent_span_id: int | None
    absorb_header: bool = False  # an eager chord: its header group is this same canvas
    started_ns: int = field(default_factory=time.time_ns)
    context: SpanContext = field(init=False, repr=False, compare=False)  # its span context

    def __post_init__(self) -> None:
        self.context = SpanContext(self.trace_id, self.span_id, is_remote=False,
                                   trace_flags=_SAMPLED)


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


_active: contextvars.ContextVar[Node | None] = contextvars.ContextVar(
    "celery_langfuse_canvas", default=None)
_bodies: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar(
    "celery_langfuse_chord_body", default=None)  # (group id, body) of the chord being run
_written: collections.OrderedDict[str, None] = collections.OrderedDict()
_originals: dict[tuple[type, str], Callable[..., Any]] = {}
_warned = False


def install() -> None:
    """Wrap ``group.apply_async``, ``group.apply`` and ``chord.apply`` (idempotent)."""
    from celery.canvas import _chain, _chord, group

    _wrap(group, "apply_async", _group_call)
    _wrap(group, "apply", _group_call)
    _wrap(_chord, "run", _chord_run_call)
    _wrap(_chord, "apply", _eager_chord_call)
    _wrap(_chain, "apply", _eager_chain_call)


def uninstall() -> None:
    for (cls, name), original in list(_originals.items()):
        setattr(cls, name, original)
    _originals.clear()


def _wrap(cls: type, name: str, make: Callable[..., Any]) -> None:
    if (cls, name) in _originals:
        return
    original = getattr(cls, name)
    _originals[(cls, name)] = original
    setattr(cls, name, functools.wraps(original)(make(original)))


def _group_call(original: Callable[..., Any]) -> Callable[..., Any]:
    eager = original.__name__ == "apply"

    def call(self: Any, *args: Any, **options: Any) -> Any:
        try:
            tasks = _members(self)
            if not tasks:
                return original(self, *args, **options)
            own = _options(self)
            group_id = options.get("task_id") or own.get("task_id") or str(uuid4())
            options["task_id"] = group_id
            callback = _chord_body(group_id, tasks)
            kind = "chord" if callback is not None else "group"
            root_id = options.get("root_id") or own.get("root_id")
            pinned = _pinned_group(own, options)
        except Exception:
            logger.exception("celery-langfuse: could not read the canvas; sent as it is")
            return original(self, *args, **options)
        return publish(kind, group_id, tasks, callback,
                       lambda: original(self, *args, **options), root_id=root_id, eager=eager,
                       pinned=pinned)

    return call


def _chord_run_call(original: Callable[..., Any]) -> Callable[..., Any]:
    """``chord.run`` knows the body; its header group is sent next, by ``group.apply_async``
    (a lazy header's members are frozen with the body only as they are sent)."""
    def call(self: Any, header: Any, body: Any, *args: Any, **options: Any) -> Any:
        try:
            own = _options(header)
            group_id = own.get("task_id") or str(uuid4())
            own["task_id"] = group_id  # what run() would pick, known before
        except Exception:
            return original(self, header, body, *args, **options)
        token = _bodies.set((group_id, body))
        try:
            return original(self, header, body, *args, **options)
        finally:
            _bodies.reset(token)

    return call


@dataclass
class PinnedGroup:
    """A group sent as a chord's callback (``chain(group, group)`` is a chord whose callback
    is the second group): the pin its sender put in its options for its members."""

    context: SpanContext  # the pinned parent: the chord's canvas node
    headers: list[dict[str, Any]]  # the options' ``headers`` dicts that hold the pin

    def unpin(self) -> None:
        """The members hang under the group's own node instead: drop the pin they would get."""
        for headers in self.headers:
            headers.pop(PARENT_HEADER, None)


def _pinned_group(own: Any, options: dict[str, Any]) -> PinnedGroup | None:
    """The pin a group's options carry (a chord's callback group, sent by a member's worker
    or an eager chord), if any."""
    holders = [h for h in (own.get("headers"), options.get("headers"))
               if isinstance(h, dict) and PARENT_HEADER in h]
    if not holders:
        return None
    parts = str(holders[0][PARENT_HEADER]).split("-")
    try:
        context = SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True,
                              trace_flags=_SAMPLED)
    except (IndexError, ValueError):
        return None
    return PinnedGroup(context, holders) if context.is_valid else None


def _chord_body(group_id: str, tasks: list[Any]) -> Any:
    pending = _bodies.get()
    if pending is not None and pending[0] == group_id:
        return pending[1]
    options = _options(tasks[0], None)
    return options.get("chord") if options else None


def _options(sig: Any, *default: Any) -> Any:
    """``sig.options``, read through the dict a Signature is (its ``options`` property is a
    Python call, and canvas sends read options often); ``default`` if it has none."""
    options = sig.get("options") if isinstance(sig, dict) else None
    return options if options is not None else getattr(sig, "options", *default)


def _eager_chord_call(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, args: Any = None, kwargs: Any = None, propagate: bool = True,
             body: Any = None, **options: Any) -> Any:
        def run() -> Any:
            return original(self, args, kwargs, propagate=propagate, body=body, **options)
        try:
            tasks = _members(self.tasks)
            callback = self.body if body is None else body
        except Exception:
            logger.exception("celery-langfuse: could not read the chord; run as it is")
            return run()
        return publish("chord", str(uuid4()), tasks, callback, run, absorb_header=True,
                       eager=True)

    return call


@dataclass
class EagerChain:
    """A chain applied eagerly (``chain.apply``): its links run one after the other in the
    caller, so each later link is placed under the link before, as a worker run places it
    (``_eager`` reads and updates this)."""

    context: SpanContext  # the caller's span when the chain started (invalid: none)
    links: set[str] = field(default_factory=set)  # task ids of its links
    previous: str | None = None  # traceparent of the last link's latest attempt


_eager_chain: contextvars.ContextVar[EagerChain | None] = contextvars.ContextVar(
    "celery_langfuse_eager_chain", default=None)


def eager_chain() -> EagerChain | None:
    return _eager_chain.get()


def _eager_chain_call(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **options: Any) -> Any:
        current = otel_trace.get_current_span().get_span_context()
        token = _eager_chain.set(EagerChain(current))
        try:
            return original(self, *args, **options)
        finally:
            _eager_chain.reset(token)

    return call


def _members(canvas: Any) -> list[Any]:
    kwargs = canvas.get("kwargs") if isinstance(canvas, dict) else None  # a group is a dict
    tasks = kwargs.get("tasks", canvas) if isinstance(kwargs, dict) else getattr(
        canvas, "tasks", canvas)
    if type(tasks) is list or type(tasks) is tuple:
        return list(tasks)
    return list(tasks) if isinstance(tasks, Iterable) else []


def publish(
    kind: str, group_id: str, members: list[Any], callback: Any, send: Callable[[], Any],
    *, absorb_header: bool = False, root_id: str | None = None, eager: bool = False,
    pinned: PinnedGroup | None = None,
) -> Any:
    """Send a canvas by ``send()`` in the context its members must hang in (table above);
    a top-level root's ids come from ``root_id`` when the sender gave one, else the group id;
    a chord's callback group (``pinned``) gets a node under the chord's.
    Whatever fails in tracing, the canvas is sent."""
    pin: contextlib.AbstractContextManager[None] = _NO_PIN
    span: NonRecordingSpan | None = None
    try:
        placed = _place(kind, group_id, members, callback, absorb_header, root_id,
                        pinned.context if pinned is not None else None)
        if placed is not None:
            config, node, parent = placed
            callback_pin = _pin(callback, parent, members, eager)
            if node is not None:
                span = NonRecordingSpan(node.context)
                if pinned is not None:
                    pinned.unpin()
            if callback_pin is not None or span is not None:
                pin = MembersSent(callback_pin, (span, parent) if span is not None else None)
    except Exception:
        logger.exception("celery-langfuse: could not place canvas %s; it is sent untraced",
                         group_id)
        placed, pin = None, _NO_PIN
    config, node, _ = placed if placed is not None else (None, None, "")
    if node is None or span is None:
        with pin:
            return send()
    token = _active.set(node)
    otel_token = otel_context.attach(otel_trace.set_span_in_context(span))
    result: Any = None
    error: BaseException | None = None
    try:
        with pin:
            result = send()
        return result
    except BaseException as exc:
        error = exc
        raise
    finally:
        otel_context.detach(otel_token)
        _active.reset(token)
        try:
            _write(config, node, result, error)
        except Exception:
            logger.exception("celery-langfuse: writing the root of canvas %s failed; the "
                             "canvas is sent unaffected", group_id)


_Placed = tuple[Any, "Node | None", str]  # configuration, node, the callback's parent


def _place(
    kind: str, group_id: str, members: list[Any], callback: Any, absorb_header: bool,
    root_id: str | None, pinned: SpanContext | None = None,
) -> _Placed | None:
    """The node to send the canvas under, with the configuration to write it with, and the
    ``traceparent`` its callback hangs under; no node under a sender's observation; None when
    it needs nothing (the same canvas again, no keys). A chord's callback group (``pinned``:
    the chord's node) gets a node under it."""
    active = _active.get()
    current = otel_trace.get_current_span().get_span_context()
    parent: Any = active if active is not None and current == active.context else None
    if parent is not None and (parent.group_id == group_id or parent.absorb_header):
        parent.absorb_header = False  # the same canvas (apply_async → apply, a chord's header)
        return None
    if pinned is not None:
        parent = pinned
    elif parent is None and current.is_valid:  # no extra root: under the sender's observation
        return None, None, f"00-{current.trace_id:032x}-{current.span_id:016x}-01"
    config = _producer.current_config()
    if not config.enabled:
        return None
    if not config.has_keys:
        _warn_no_keys()
        return None
    if parent is None:
        tree = root_id or group_id
        trace_hex, span_hex = trace_id_for(tree), root_observation_id_for(tree)
        trace_id, parent_span = int(trace_hex, 16), None
    else:
        trace_id, parent_span = parent.trace_id, parent.span_id
        trace_hex, span_hex = f"{trace_id:032x}", root_observation_id_for(group_id)
    node = Node(kind, group_id, members, callback, trace_id, int(span_hex, 16), parent_span,
                absorb_header)
    return config, node, f"00-{trace_hex}-{span_hex}-01"


_NO_PIN: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def _pin(callback: Any, traceparent: str, members: list[Any],
         eager: bool) -> tuple[str, str] | None:
    """Pin the chord callback ``callback`` under ``traceparent`` (module docstring): on the
    members' messages (then (callback id, traceparent) is returned, for ``MembersSent``),
    else in the callback's options (None is returned, as for a group, which has none)."""
    options = _options(callback, None) if callback is not None else None
    if options is None:
        return None
    callback_id = options.get("task_id")
    if (not eager and type(callback_id) is str and is_task(callback)
            and all(map(is_task, members)) and _joined_by_members(callback)):
        return callback_id, traceparent
    headers = options.get("headers")
    options["headers"] = ({**headers, PARENT_HEADER: traceparent} if headers
                          else {PARENT_HEADER: traceparent})
    return None


def _joined_by_members(callback: Any) -> bool:
    """Whether the chord's callback is published by a member's worker (a backend with a
    chord join of its own) rather than by a ``celery.chord_unlock`` task polling for it
    (Celery's base ``Backend.apply_chord``); False when that cannot be told."""
    try:
        app = getattr(callback, "_app", None) or current_app
        apply_chord = getattr(app.backend, "apply_chord", None)
    except Exception:  # a backend that cannot be built here: pin in the callback
        return False
    return getattr(apply_chord, "__func__", None) not in (None, Backend.apply_chord)


def _write(config: Any, node: Node, result: Any, error: BaseException | None) -> None:
    if node.group_id in _written:
        return  # the same frozen canvas sent twice: one root
    _written[node.group_id] = None
    if len(_written) > 1000:
        _written.popitem(last=False)
    if config.sample_rate < 1 and not _producer.sampled(config, f"{node.trace_id:032x}"):
        return
    _producer.write(config, canvas_frame(config, node, result, error))


def _warn_no_keys() -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "celery-langfuse: a canvas (group/chord) was sent from a process without "
            "LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY: its root observation cannot be "
            "shipped from here, so each member is a trace of its own. Set the keys in the "
            "sending process to see the canvas as one trace.")

"""One Langfuse observation per task attempt, opened and closed by Celery's signals.

``task_prerun`` opens the observation (named after the task, type ``span`` unless the task
asks otherwise), makes it the current OpenTelemetry context while the body runs — so
``get_client()``, ``@observe`` and ``langfuse.openai`` calls nest under it — and records the
open attempt in the spool. Where it hangs in its trace is ``_task_span``'s rule (the
producer's or previous task's observation, else the tree's root derived from ``root_id``).
``task_postrun`` closes it with the end the task had (ends that only the worker's main
process sees are ``_task_elsewhere``'s):

=====================  =========  ===========================================================
end                    level      status message / where
=====================  =========  ===========================================================
SUCCESS                DEFAULT    output captured
FAILURE                ERROR      ``ExcType: message``, traceback in metadata
in ``task.throws``     WARNING    ``ExcType: message`` (an expected error)
RETRY                  WARNING    reason and when the next attempt runs
IGNORED                DEFAULT    ``ignored``
REJECTED               WARNING    the reason; also a message rejected by the consumer
REVOKED                WARNING    expired / terminated (main process)
unknown task           ERROR      main process, a fresh observation
internal error         ERROR      an error in Celery around the body
hard time limit,       ERROR      main process, under the dead child's ids (``_attempts``)
worker lost
=====================  =========  ===========================================================

Every handler catches and logs its own errors: tracing never breaks a task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from langfuse import propagate_attributes
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from tracing.instrumentation import _runtime
from tracing.instrumentation._client import task_tracer
from tracing.instrumentation._experiment_span import experiment_attributes
from tracing.instrumentation._options import TaskOptions, options_for
from tracing.instrumentation._otel import drop_counter, task_context
from tracing.instrumentation._payload import clean_text
from tracing.instrumentation._propagation import CALLBACK_KEY, TraceAttributes, read_headers
from tracing.instrumentation._redelivery import execution_of
from tracing.instrumentation._task_common import (
    Outcome,
    describe,
    mark_error,
    never_raises,
    safely,
    start_span,
    traceback_text,
)
from tracing.instrumentation._task_common import render as _render
from tracing.instrumentation._task_elsewhere import emit_observation, failure_elsewhere
from tracing.instrumentation._task_span import (
    claimed,
    end_attributes,
    start_attributes,
)
from tracing.spool import KIND_DROPPED, encode_frame
from tracing.spool._attempts import open_frame

logger = logging.getLogger("celery_langfuse")


@dataclass
class _Active:
    """A task attempt whose observation (an OpenTelemetry span) is open in this process."""

    span: Any
    tokens: list[Any]
    options: TaskOptions
    outcome: Outcome | None = None


_active: dict[str, _Active] = {}
_cut_short: dict[str, _Active] = {}  # bodies interrupted before a final state (see _interrupted)
# Attempts ended here lately, by task id: Celery stores the result *after* task_postrun, so a
# result-store failure (task_internal_error) arrives for an attempt that is already ended.
# Only the span's ids are kept: a span object holds every attribute (input, output).
_ended: dict[str, tuple[str, SpanContext]] = {}  # oldest first


# -- task start -------------------------------------------------------------------------------

@never_raises
def on_task_prerun(
    sender: Any = None, task_id: str | None = None, task: Any = None,
    args: Any = None, kwargs: Any = None, **_: Any,
) -> None:
    runtime = _runtime.current()
    if runtime is None or task is None or task_id is None:
        return
    config = runtime.config
    if config.is_excluded(task.name):
        _carry_callback_pin(task_id, task.request)
        return
    options = options_for(task)
    request = task.request
    incoming = read_headers(request)
    capture = config.capture_input if options.capture_input is None else options.capture_input
    input_text = safely("rendering the task's input", "<input could not be rendered>",
                         lambda: _render({"args": args, "kwargs": kwargs})) if capture else None
    metadata: dict[str, Any] = safely("collecting the task's metadata", {"task_id": task_id},
                       lambda: task_metadata(task, request, task_id))
    join = options.join or incoming.attributes.join or config.join
    carrier, root_id = joined(join, incoming.carrier, task_id,
                              getattr(request, "root_id", None), metadata)
    queue_wait = queue_wait_ms(incoming.sent_at, getattr(request, "eta", None))
    if queue_wait is not None:
        metadata["queue_wait_ms"] = queue_wait
    execution, redelivered = safely("telling a redelivery", (1, False),
                                    lambda: execution_of(task_id, request))
    if redelivered:
        metadata["redelivered"] = True
    if execution > 1:
        metadata["execution"] = execution
    span = start_span(
        task.name, task_id, root_id, getattr(request, "retries", 0) or 0, carrier,
        options.as_type, input_text=input_text, metadata=metadata, options=options,
        version=options.version or incoming.attributes.version, execution=execution,
    )
    # Registered before anything else can fail, so task_postrun always ends the observation
    # and detaches the context: a context left attached would leak into the next task.
    context = task_context(span)
    if incoming.callbacks:  # a chord member: where its chords' callbacks go
        context = otel_context.set_value(CALLBACK_KEY, incoming.callbacks, context)
    active = _active[task_id] = _Active(span, [otel_context.attach(context)], options)
    experiment: dict[str, Any] = safely(
        "reading the experiment header", {}, lambda: experiment_attributes(request))
    if experiment:  # an item of run_experiment: before the open attempt records the span
        span.set_attributes(experiment)
    attributes = incoming.attributes if options.trace_attributes is None else (
        incoming.attributes.merged(_extract(options, kwargs)))
    propagation = _propagate(attributes)
    if propagation is not None:
        propagation.__enter__()
        active.tokens.append(propagation)
    if span.is_recording():
        runtime.write_frames(open_frame(task_id, span))


def _carry_callback_pin(task_id: str, request: Any) -> None:
    """A chord member excluded from tracing has no observation, but the callback its
    completion sends still goes under the parent its message pinned (``_propagation``)."""
    callbacks = read_headers(request).callbacks
    if callbacks:
        _untraced[task_id] = otel_context.attach(otel_context.set_value(CALLBACK_KEY, callbacks))


_untraced: dict[str, Any] = {}  # excluded chord members: task id -> their context's token


def joined(
    join: str, carrier: Mapping[str, str], task_id: str, root_id: str | None,
    metadata: dict[str, Any],
) -> tuple[Mapping[str, str], str | None]:
    """The carrier and root id the attempt is placed by, for a join mode.

    ``parent``: the sender's context as sent. ``link``: a trace of the task's own, the
    sender's trace and observation ids in metadata (Langfuse renders no OpenTelemetry
    links). ``off``: the sender's context is ignored.
    """
    if join == "parent" or "traceparent" not in carrier:
        return carrier, root_id
    if join == "link":
        parts = carrier["traceparent"].split("-")
        if len(parts) >= 3:
            metadata["linked_trace_id"], metadata["linked_observation_id"] = parts[1], parts[2]
        return {}, task_id
    return {}, root_id


def queue_wait_ms(sent_at: float | None, eta: Any) -> float | None:
    """How long the message waited before its body started: from the publish time (or its
    ETA, if later) to now, never negative (another host's clock may be ahead of ours)."""
    if sent_at is None:
        return None
    ready = sent_at
    if eta:
        with contextlib.suppress(ValueError):
            ready = max(ready, datetime.fromisoformat(str(eta)).timestamp())
    return round(max(0.0, time.time() - ready) * 1000.0, 1)


def _extract(options: TaskOptions, kwargs: Any) -> TraceAttributes:
    if options.trace_attributes is None:
        return TraceAttributes()
    try:
        return TraceAttributes.from_mapping(options.trace_attributes(kwargs or {}) or {})
    except Exception:
        logger.exception("celery-langfuse: the task's trace_attributes extractor failed")
        return TraceAttributes()


_NO_ATTRIBUTES = TraceAttributes()


def _propagate(attributes: TraceAttributes) -> Any:
    if attributes == _NO_ATTRIBUTES:
        return None
    metadata = {k: v if isinstance(v, str) else str(v) for k, v in attributes.metadata.items()}
    return propagate_attributes(
        user_id=attributes.user_id, session_id=attributes.session_id,
        tags=list(attributes.tags) or None, metadata=metadata or None,
        trace_name=attributes.trace_name, version=attributes.version,
    )


def task_metadata(task: Any, request: Any, task_id: str) -> dict[str, Any]:
    """The Celery facts every task observation carries."""
    delivery = getattr(request, "delivery_info", None) or {}
    meta = {
        "task_id": task_id,
        "task_name": task.name,
        "attempt": (getattr(request, "retries", 0) or 0) + 1,
        "retries": getattr(request, "retries", 0) or 0,
        "max_retries": getattr(task, "max_retries", None),
        "queue": delivery.get("queue") or delivery.get("routing_key"),
        "routing_key": delivery.get("routing_key"),
        "exchange": delivery.get("exchange"),
        "hostname": getattr(request, "hostname", None),
        "pid": os.getpid(),
        "root_id": getattr(request, "root_id", None),
        "parent_id": getattr(request, "parent_id", None),
        "group_id": getattr(request, "group", None),
        "eta": getattr(request, "eta", None),
        "expires": getattr(request, "expires", None),
    }
    return {k: str(v) if not isinstance(v, (int, str)) else v
            for k, v in meta.items() if v is not None and v != ""}


# -- ends seen in the process that ran the body -----------------------------------------------

@never_raises
def on_task_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    einfo: Any = None, **_: Any,
) -> None:
    if task_id is None:
        return
    active = _active.get(task_id)
    if active is None:
        failure_elsewhere(sender, task_id, exception)
        return
    throws = tuple(getattr(sender, "throws", ()) or ())
    expected = bool(throws) and isinstance(exception, throws)
    active.outcome = Outcome(
        "WARNING" if expected else "ERROR",
        describe(exception),
        {"traceback": traceback_text(einfo, exception), "expected_error": expected},
    )


@never_raises
def on_task_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    active = _active.get(task_id) if task_id else None
    if active is None:
        return
    when = getattr(reason, "when", None)
    cause = getattr(reason, "exc", None) or reason
    message = f"retry: {describe(cause)}" + (f" (next attempt {_when(when)})" if when else "")
    active.outcome = Outcome("WARNING", message, {"retry_reason": str(reason),
                                                   "retry_when": str(when)})


def _when(when: Any) -> str:
    return f"in {when:g}s" if isinstance(when, (int, float)) else f"at {when}"


@never_raises
def on_task_internal_error(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    einfo: Any = None, **_: Any,
) -> None:
    if task_id is None:
        return
    outcome = Outcome("ERROR", f"internal error: {describe(exception)}",
                       {"traceback": traceback_text(einfo, exception)})
    # Celery signals an internal error after task_postrun, which saw no final state and
    # left the attempt cut short: end it here, in the process that opened it.
    active = _cut_short.pop(task_id, None) or _active.pop(task_id, None)
    if active is not None:
        active.outcome = outcome
        _end(active, "FAILURE", None, task_id)
    elif task_id in _ended:
        _event_after_end(task_id, outcome)
    elif sender is not None:
        emit_observation(sender.name, task_id, None, outcome, "FAILURE")


def _event_after_end(task_id: str, outcome: Outcome) -> None:
    """An error Celery raised after the attempt ended (storing the result failed): an ERROR
    event under the attempt's observation, never a second task observation."""
    runtime = _runtime.current()
    if runtime is None:
        return
    state, ended = _ended.pop(task_id)
    parent = otel_trace.set_span_in_context(NonRecordingSpan(ended), otel_context.Context())
    context = claimed(parent, ended.trace_id)  # a child of the ended span, never an app root
    message = f"after {state}: {outcome.status_message}"
    event = task_tracer(runtime.config.public_key or "").start_span(
        "celery: storing the result failed", context=context,
        attributes={**start_attributes("event", None, outcome.metadata, None, None),
                    **end_attributes(None, "ERROR", message, {})},
    )
    event.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, message))
    event.end(end_time=event.start_time)
    runtime.flush()


@never_raises
def on_task_postrun(
    sender: Any = None, task_id: str | None = None, retval: Any = None, state: str | None = None,
    **_: Any,
) -> None:
    if task_id is None:
        return
    untraced = _untraced.pop(task_id, None)
    if untraced is not None:
        otel_context.detach(untraced)
        return
    if state is None:
        _interrupted(task_id)
    else:
        _finish(task_id, state, retval)


def _interrupted(task_id: str) -> None:
    """The body was cut short: SystemExit/SIGTERM (a hard time limit's first signal) or an
    error inside Celery around the body (``task_internal_error`` follows).

    The attempt is not ended here. If the process is going away, the main process (with
    Celery's reason) or the shipper closes it under the same ids; ending it here too would
    send the same observation twice. An internal error ends it in ``on_task_internal_error``.
    """
    active = _active.pop(task_id, None)
    runtime = _runtime.current()
    if active is not None:
        _detach(active.tokens)
        active.tokens = []
        _cut_short[task_id] = active
    if runtime is not None:
        runtime.flush()


def _finish(task_id: str, state: str, retval: Any) -> None:
    active = _active.pop(task_id, None)
    if active is not None:
        _end(active, state, retval, task_id)


def _end(active: _Active, state: str, retval: Any, task_id: str) -> None:
    """End the attempt's span with its outcome; whatever fails, the span ends and the
    context is detached."""
    runtime = _runtime.current()
    span = active.span
    try:
        if runtime is None:
            return
        outcome = active.outcome or _outcome_for_state(state, retval)
        capture = active.options.capture_output
        capture = runtime.config.capture_output if capture is None else capture
        output = safely("rendering the task's result", "<output could not be rendered>",
                         lambda: _render(retval)) if capture and state == "SUCCESS" else None
        span.set_attributes(end_attributes(
            output, outcome.level, clean_text(outcome.status_message),
            {**outcome.metadata, "final_state": state}))
        mark_error(span, outcome)
    finally:
        _detach(active.tokens)
        span.end()  # in the spool when this returns (``_pipeline``): nothing to flush
        _remember_ended(task_id, state, span)
        if runtime is not None:
            _report_drops(runtime)


_drops_logged = False


def _report_drops(runtime: Any) -> None:
    """Spans OpenTelemetry dropped in this process (its queue was full) go into the spool
    as a ``KIND_DROPPED`` record, so the shipper's status counts them; logged once."""
    global _drops_logged
    count = drop_counter.take()
    if not count:
        return
    payload = json.dumps({"cause": "sdk_queue_full", "count": count}).encode()
    runtime.write_frames(encode_frame(KIND_DROPPED, payload))
    if not _drops_logged:
        _drops_logged = True
        logger.error("celery-langfuse: OpenTelemetry dropped %d span(s) in process %d because "
                     "its span queue was full; they are counted in `python -m tracing status`",
                     count, os.getpid())


def _remember_ended(task_id: str, state: str, span: Any) -> None:
    _ended[task_id] = (state, span.get_span_context())
    if len(_ended) > 1000:
        del _ended[next(iter(_ended))]


def _outcome_for_state(state: str, retval: Any) -> Outcome:
    if state == "IGNORED":
        return Outcome("DEFAULT", "ignored")
    if state == "REJECTED":
        return Outcome("WARNING", f"rejected: {describe(retval)}" if retval else "rejected")
    if state == "SUCCESS":
        return Outcome()
    return Outcome("WARNING", state.lower())


def _detach(tokens: list[Any]) -> None:
    for token in reversed(tokens):
        try:
            if hasattr(token, "__exit__"):
                token.__exit__(None, None, None)
            else:
                otel_context.detach(token)
        except Exception:
            logger.debug("celery-langfuse: context detach failed", exc_info=True)



"""Canvas placement rules without a worker: names, the pinned callback parent, the fallback
without keys; and status texts that are cut end with "…"."""

# ruff: noqa: RUF001  (canvas names use the multiplication sign)
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, signals
from celery.canvas import chunks, xmap

import tracing
from tracing.instrumentation import _canvas, _instrument, _producer, _propagation
from tracing.instrumentation._canvas_span import canvas_name
from tracing.shipping._delivery import SendResult, cut, describe
from tracing.spool import KIND_SPAN, list_segments, scan_file


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("canvas-rules", broker="memory://", backend="cache+memory://")
    yield app
    app.close()


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """Headers of every message published while the test runs, as the broker gets them."""
    seen: list[dict[str, Any]] = []
    _propagation.connect_publish_handler()

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(headers if headers is not None else {})

    signals.before_task_publish.connect(record, weak=False)
    yield seen
    signals.before_task_publish.disconnect(record)


@pytest.fixture
def producer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process as a producer with keys and a private spool; its shipper never starts."""
    config = tracing.load_config(environ={
        "LANGFUSE_PUBLIC_KEY": "pk-lf-rules", "LANGFUSE_SECRET_KEY": "sk-lf-rules",
        "LANGFUSE_BASE_URL": "http://127.0.0.1:9", "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path)})
    monkeypatch.setattr(_instrument, "_config", config)
    for name, value in (("_shipper", False), ("_pid", 0), ("_writers", {}), ("_config", None)):
        monkeypatch.setattr(_producer, name, value)
    monkeypatch.setattr(_producer, "_forget_after_fork", lambda: None)
    yield tmp_path


def spans_on(spool: Path) -> int:
    return sum(1 for path, _ in list_segments(spool) for r in scan_file(path).records
               if r.kind == KIND_SPAN)


def test_canvas_names_say_what_the_canvas_is(app):
    """Names count members per task, name the callback, and describe a canvas inside one
    and the chunks of ``chunks`` (``celery.starmap`` running a task)."""
    add, total = app.signature("t.add"), app.signature("t.total")
    assert canvas_name("chord", [add] * 4, total) == "chord: t.add ×4 → t.total"
    assert canvas_name("group", [add, add, total], None) == "group: t.add ×2, t.total"
    assert canvas_name("group", [chain(add, total)], None) == "group: chain(t.add → t.total)"
    inner = chord([add, add], total)
    assert canvas_name("group", [inner, inner], None) == "group: chord(t.add ×2 → t.total) ×2"
    many = [app.signature(f"t.{i}") for i in range(5)]
    assert canvas_name("group", many, None) == "group: t.0, t.1, t.2, +2 more"
    chunked = chunks(add, [(1, 2), (3, 4)], 1).group().tasks
    assert canvas_name("group", list(chunked), None) == "group: starmap(t.add) ×2"
    assert canvas_name("group", [xmap(add, [1, 2])], None) == "group: map(t.add)"


def test_a_chord_writes_one_root_and_pins_its_callback(app, published, producer):
    """A chord sent from outside a trace: one span record on the producer's spool, every
    member's traceparent names the root, and the callback it carries is pinned to it."""
    result = chord([app.signature("t.add", args=[i, i]) for i in range(3)],
                   app.signature("t.total")).apply_async()
    group_id = result.parent.id
    root = (f"00-{tracing.trace_id_for(group_id)}-"
            f"{tracing.root_observation_id_for(group_id)}-01")
    assert [h["traceparent"] for h in published] == [root] * 3
    assert spans_on(producer) == 1
    callback = result.id  # the callback's parent travels on each member's message
    assert [h[_propagation.CALLBACK_HEADER] for h in published] == [f"{callback} {root}"] * 3
    assert _propagation.PARENT_HEADER not in str(published)


def test_a_chord_with_a_chain_member_pins_its_callback_in_the_callback(
        app, published, producer):
    """A chain among a chord's members sends the callback from its last link, whose message
    the sender never publishes: the pin goes into the callback signature instead, which
    every member carries."""
    embedded: list[Any] = []

    def record(body: Any = None, **_: Any) -> None:
        embedded.append(body[2]["chord"] or body[2]["chain"][0]["options"]["chord"])

    signals.before_task_publish.connect(record, weak=False)
    try:
        result = chord([chain(app.signature("t.add", args=[1, 1]), app.signature("t.add")),
                        app.signature("t.add", args=[2, 2])],
                       app.signature("t.total")).apply_async()
    finally:
        signals.before_task_publish.disconnect(record)
    group_id = result.parent.id
    root = (f"00-{tracing.trace_id_for(group_id)}-"
            f"{tracing.root_observation_id_for(group_id)}-01")
    assert all(_propagation.CALLBACK_HEADER not in h for h in published)
    assert len(embedded) == 2
    assert [c["options"]["headers"][_propagation.PARENT_HEADER] for c in embedded] == [root] * 2


def test_a_chord_members_worker_sends_the_callback_under_the_pin():
    """In a chord member's task (its message carried the callback's parent), the publish of
    that callback goes under the pin; any other task it sends goes under the member; a
    header that is not ``<id> <traceparent>`` (or a list of them) is ignored."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    pinned = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    request = type("Request", (), {"headers": {
        _propagation.CALLBACK_HEADER: f"cb-1 {pinned}"}})()
    incoming = _propagation.read_headers(request)
    assert incoming.callbacks == (("cb-1", pinned),)
    for bad in ("cb-1", f" {pinned}", "cb-1 not-a-traceparent", 7, [7, "cb-1"], {"cb-1": 1}):
        request.headers = {_propagation.CALLBACK_HEADER: bad}
        assert _propagation.read_headers(request).callbacks == ()
    member = SpanContext(0xC, 0xD, False, TraceFlags(1))
    context = otel_context.set_value(
        _propagation.CALLBACK_KEY, incoming.callbacks,
        otel_trace.set_span_in_context(NonRecordingSpan(member)))
    token = otel_context.attach(context)
    try:
        callback: dict[str, Any] = {"id": "cb-1"}
        other: dict[str, Any] = {"id": "t-2"}
        _propagation._on_before_publish(sender="t.total", headers=callback)
        _propagation._on_before_publish(sender="t.add", headers=other)
    finally:
        otel_context.detach(token)
    assert callback["traceparent"] == pinned
    assert other["traceparent"] == f"00-{0xC:032x}-{0xD:016x}-01"
    assert _propagation.CALLBACK_HEADER not in callback | other


def test_a_message_carries_the_pin_of_every_chord_it_fires():
    """A member replaced by a chord: the inner chord's members carry the outer chord's pin
    (their callback fires it) beside their own chord's; the inner callback is published
    under its own pin and carries the outer one on; ids may hold spaces."""
    from opentelemetry import context as otel_context

    outer = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    inner = "00-" + "a" * 32 + "-" + "c" * 16 + "-01"
    request = type("Request", (), {"headers": {
        _propagation.CALLBACK_HEADER: [f"outer cb {outer}", f"inner-cb {inner}"]}})()
    pins = _propagation.read_headers(request).callbacks
    assert pins == (("outer cb", outer), ("inner-cb", inner))
    fires_outer = ([], {}, {"chord": {"task": "t.total", "options": {"task_id": "outer cb"}}})
    token = otel_context.attach(otel_context.set_value(_propagation.CALLBACK_KEY, pins[:1]))
    try:
        member: dict[str, Any] = {"id": "m-1"}
        with _propagation.MembersSent(pins[1], None):  # the replacing chord's members
            _propagation._on_before_publish(sender="t.add", headers=member, body=fires_outer)
    finally:
        otel_context.detach(token)
    assert member[_propagation.CALLBACK_HEADER] == [f"outer cb {outer}", f"inner-cb {inner}"]
    token = otel_context.attach(otel_context.set_value(_propagation.CALLBACK_KEY, pins))
    try:
        callback: dict[str, Any] = {"id": "inner-cb"}
        _propagation._on_before_publish(sender="t.echo", headers=callback, body=fires_outer)
    finally:
        otel_context.detach(token)
    assert callback["traceparent"] == inner
    assert callback[_propagation.CALLBACK_HEADER] == f"outer cb {outer}"


def test_the_canvas_input_is_redacted_like_a_tasks(app, published, producer):
    """A member's secret-looking kwarg is redacted in the canvas root's input; the others
    are kept, as the members' own observations render them."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from tracing.spool._spanrecord import otlp_request
    from tracing.testing import observations_from_otlp

    group(app.signature("t.call", kwargs={"api_key": "sk-live-123", "q": "hello"}),
          app.signature("t.call", kwargs={"q": "bye"})).apply_async()
    [record] = [r for path, _ in list_segments(producer) for r in scan_file(path).records
                if r.kind == KIND_SPAN]
    request = ExportTraceServiceRequest.FromString(otlp_request(record.payload))
    [root] = observations_from_otlp(request, 0.0)
    assert root.name == "group: t.call ×2" and root.parent_observation_id is None
    first, second = root.input["members"]
    assert first["kwargs"]["q"] == "hello" and "sk-live-123" not in str(root.input)
    assert second["kwargs"] == {"q": "bye"}


class _Text(str):
    """A user's str subclass (marshal refuses it; OpenTelemetry's encoder sends its text)."""

    def __str__(self) -> str:
        return "not the text"


@pytest.mark.parametrize("case", ["root", "nested, failed"])
def test_the_canvas_record_is_the_span_the_sdk_would_write(app, monkeypatch, case):
    """The canvas root, written as a compact record without an OpenTelemetry span, ships as
    exactly the OTLP OpenTelemetry's encoder makes of the span the Langfuse SDK would have
    written (its attribute names, resource, scope with the public key, parent flags)."""
    from langfuse._client.attributes import LangfuseOtelSpanAttributes as A
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    from tracing._sdk import sdk_version
    from tracing.instrumentation import _canvas_span
    from tracing.spool import scan
    from tracing.spool._spanrecord import otlp_request

    config = tracing.load_config(environ={
        "LANGFUSE_PUBLIC_KEY": "pk-lf-record", "LANGFUSE_SECRET_KEY": "sk",
        "LANGFUSE_TRACING_ENVIRONMENT": "staging", "LANGFUSE_RELEASE": "1.2.3"})
    monkeypatch.setattr(_canvas_span, "time", type("T", (), {"time_ns": lambda: 2_000}))
    nested, error = case != "root", RuntimeError("broker down") if case != "root" else None
    members = [app.signature("t.add", args=[1, 2]), app.signature("t.add", kwargs={"n": 3})]
    node = _canvas.Node("chord", "g-1", members, app.signature("t.total"), 0xABC, 0xDEF,
                        0x123 if nested else None, started_ns=1_000)
    with _propagation.trace_attributes(user_id=_Text("u-1"), tags=["a"], trace_name="nightly",
                                       metadata={"k": 5}):
        frame = _canvas_span.canvas_frame(config, node, None, error)
    [record] = scan(frame).records
    ours = ExportTraceServiceRequest.FromString(otlp_request(record.payload))

    members_text = ('{"members":[{"task":"t.add","args":[1,2],"kwargs":{}},{"task":"t.add",'
                    '"args":[],"kwargs":{"n":3}}],"callback":{"task":"t.total","args":[],'
                    '"kwargs":{}}}')
    message = "publishing failed: RuntimeError: broker down"
    attributes = {A.OBSERVATION_TYPE: "chain", A.OBSERVATION_INPUT: members_text,
                  A.ENVIRONMENT: "staging", A.RELEASE: "1.2.3",
                  f"{A.OBSERVATION_METADATA}.canvas": '"chord"',
                  f"{A.OBSERVATION_METADATA}.group_id": '"g-1"',
                  f"{A.OBSERVATION_METADATA}.members": "2",
                  A.OBSERVATION_LEVEL: "ERROR" if error else "DEFAULT",
                  A.OBSERVATION_OUTPUT: '{"group_id": "g-1", "task_ids": []}'}
    if error:
        attributes[A.OBSERVATION_STATUS_MESSAGE] = message
    else:  # a top-level root carries the trace attributes
        attributes.update({A.TRACE_NAME: "nightly", A.TRACE_USER_ID: "u-1",
                           A.TRACE_TAGS: ("a",), f"{A.TRACE_METADATA}.k": "5"})
    expected = ReadableSpan(
        name="chord: t.add ×2 → t.total" if nested else "nightly",
        context=SpanContext(0xABC, 0xDEF, False, TraceFlags(1)),
        parent=SpanContext(0xABC, 0x123, True, TraceFlags(1)) if nested else None,
        resource=Resource({A.ENVIRONMENT: "staging", A.RELEASE: "1.2.3"}),
        attributes=attributes, kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, message) if error else Status(StatusCode.UNSET),
        start_time=1_000, end_time=2_000,
        instrumentation_scope=InstrumentationScope("langfuse-sdk", sdk_version(), None,
                                                   {"public_key": "pk-lf-record"}))
    assert ours == encode_spans([expected])


def test_a_pinned_parent_is_used_for_one_publish_then_dropped():
    """The publish handler sends a message with a pinned parent under it and drops the pin,
    so the task's retries (which copy its headers) hang under the attempt before."""
    pinned = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    headers: dict[str, Any] = {"id": "cb", _propagation.PARENT_HEADER: pinned}
    _propagation._on_before_publish(sender="t.total", headers=headers)
    assert headers["traceparent"] == pinned and "headers" not in headers
    assert _propagation.PARENT_HEADER not in headers
    plain: dict[str, Any] = {"id": "t"}
    _propagation._on_before_publish(sender="t.add", headers=plain)
    assert "traceparent" not in plain  # no context: nothing invented


def test_without_keys_a_canvas_is_sent_as_before_and_said_once(
        app, published, tmp_path, monkeypatch, caplog):
    """A producer without Langfuse keys sends the group unchanged (no root it could not ship)
    and says once why its members are traces of their own."""
    monkeypatch.setattr(_instrument, "_config", tracing.load_config(environ={
        "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path)}))
    monkeypatch.setattr(_producer, "_config", None)
    monkeypatch.setattr(_canvas, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        group(app.signature("t.add", args=[1, 1]) for _ in range(2)).apply_async()
        group(app.signature("t.add", args=[1, 1]) for _ in range(2)).apply_async()
    assert len(published) == 4 and not any("traceparent" in h for h in published)
    assert spans_on(tmp_path) == 0
    assert len([r for r in caplog.records if "LANGFUSE_PUBLIC_KEY" in r.message]) == 1


def test_a_failure_in_tracing_never_stops_a_canvas(app, published, monkeypatch, caplog):
    """When placing the canvas fails (here: the configuration cannot be read), the group is
    sent anyway and the failure is logged."""
    def broken() -> None:
        raise tracing.ConfigError("CELERY_LANGFUSE_SPOOL_MAX_BYTES='x': expected a size")

    monkeypatch.setattr(_producer, "current_config", broken)
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        result = group(app.signature("t.add", args=[1, 1]) for _ in range(2)).apply_async()
    assert len(published) == 2 and len(result.results) == 2
    assert any("sent untraced" in r.message for r in caplog.records)


def test_a_status_text_that_is_cut_ends_with_an_ellipsis():
    """A failure's text cut to fit ends with "…"; one that fits is unchanged."""
    long = describe(SendResult(500, body="x" * 500))
    assert long.endswith("…") and len(long) == len("HTTP 500: ") + 200
    assert describe(SendResult(502, body="bad gateway")) == "HTTP 502: bad gateway"
    assert cut("abc", 3) == "abc" and cut("abcd", 3) == "ab…"


def test_a_status_message_cut_in_a_trace_tree_ends_with_an_ellipsis(receiver):
    """The receiver's tree (what `make demo` prints) cuts a long status message to one line
    that ends with "…"."""
    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider

    from tracing import _sdk

    client = Langfuse(public_key=receiver.public_key, secret_key=receiver.secret_key,
                      base_url=receiver.base_url, tracer_provider=TracerProvider())
    try:
        with client.start_as_current_observation(name="job") as job:
            job.update(level="ERROR", status_message="boom\n" + "kaput " * 100)
        client.flush()
        [obs] = receiver.wait_for_count(1, name="job")
    finally:
        _sdk.forget_client(receiver.public_key)
    [line] = [x for x in receiver.tree(obs.trace_id).splitlines() if "job [span]" in x]
    assert '"boom kaput kaput' in line and line.endswith('…"')


@pytest.mark.parametrize("kwargs", [
    {"text": "héllo \u2028 \"quoted\"", "n": 3, "flag": True, "off": False, "none": None},
    {"ratio": 0.25, "nested": {"a": [1, (2, 3)], "b": {"c": "d"}}, "items": []},
    {"secret_token": "sk-1", "q": "x"},  # redacted: rendered the long way
    {"deep": {"api_key": "sk-2"}},  # redacted at depth
    {"nan": float("nan")},  # not plain JSON
    {"lone": "\ud800"},  # a lone surrogate
])
def test_the_direct_canvas_input_is_the_rendered_one(app, kwargs):
    """The canvas input written straight from task signatures is exactly the text the full
    rendering (redaction, cap) makes of the same members, whatever their values."""
    from tracing.instrumentation import _canvas_span

    config = tracing.load_config(environ={"LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk"})
    members = [app.signature("t.a", args=(1, "two", [3.5]), kwargs=kwargs),
               app.signature("t.b", kwargs=kwargs)]
    members[0].freeze()
    node = _canvas.Node("chord", "g-1", members, app.signature("t.c", args=[None]), 1, 2, None)
    shape = _canvas_span._shape(node.kind, node.members, node.callback)
    rendered = _canvas_span._input_text(_canvas_span._members_value(node, shape), config)
    direct = _canvas_span._members_text(node, shape, config)
    assert direct in (None, rendered)
    assert (direct is None) == any(k in kwargs for k in ("secret_token", "deep", "nan", "lone"))


def test_a_message_fires_the_chord_when_it_or_its_chains_last_link_carries_it():
    """``fires_chord`` finds the callback in a message's own chord or in a chain link's
    ``chord`` option (a member replaced by a chain), and nowhere else."""
    callback = {"task": "t.total", "options": {"task_id": "cb-1"}}
    last = {"task": "t.add", "options": {"chord": callback}}
    assert _propagation.fires_chord(((), {}, {"chord": callback}), "cb-1")
    assert _propagation.fires_chord(((), {}, {"chord": None, "chain": [last]}), "cb-1")
    assert not _propagation.fires_chord(((), {}, {"chord": callback}), "cb-2")
    assert not _propagation.fires_chord(((), {}, {"chain": [{"task": "t.add"}]}), "cb-1")
    inner = {"task": "celery.accumulate", "options": {"task_id": "acc", "chord": callback}}
    assert _propagation.fires_chord(((), {}, {"chord": inner}), "cb-1")  # replaced by a group
    for odd in (None, b"raw", ((), {}), ((), {}, "embed"), ((), {}, {"chain": ["x"]})):
        assert not _propagation.fires_chord(odd, "cb-1")


def test_members_get_the_nodes_traceparent_only_while_the_node_is_current():
    """While a canvas's members are sent, a message published with the canvas node current
    gets the node's traceparent as written; one published while another span is current (an
    eager member's body sending a task) hangs under that span."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    node = NonRecordingSpan(SpanContext(0xA, 0xB, False, TraceFlags(1)))
    written = f"00-{0xA:032x}-{0xB:016x}-01"
    member = NonRecordingSpan(SpanContext(0xA, 0xC, False, TraceFlags(1)))
    sent: list[dict[str, Any]] = [{"id": "m-1"}, {"id": "t-2"}]
    with _propagation.MembersSent(("cb-1", written), (node, written)):
        token = otel_context.attach(otel_trace.set_span_in_context(node))
        try:
            _propagation._on_before_publish(sender="t.add", headers=sent[0])
            inner = otel_context.attach(otel_trace.set_span_in_context(member))
            _propagation._on_before_publish(sender="t.other", headers=sent[1])
            otel_context.detach(inner)
        finally:
            otel_context.detach(token)
    assert sent[0]["traceparent"] == written
    assert sent[1]["traceparent"] == f"00-{0xA:032x}-{0xC:016x}-01"
    assert [h[_propagation.CALLBACK_HEADER] for h in sent] == [f"cb-1 {written}"] * 2

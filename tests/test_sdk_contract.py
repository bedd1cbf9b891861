"""Contracts with the Langfuse SDK's and OpenTelemetry's private internals (``tracing._sdk``).

One test per accessor: each fails with a message naming the installed langfuse version when
the SDK changes shape, so an upgrade that breaks the no-loss wiring is caught here, not in a
trace that never arrives. CI runs this file against the lowest and the newest langfuse 5.x
that pyproject allows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from langfuse import Langfuse
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracing import _sdk
from tracing.instrumentation._client import MediaRouter, task_tracer
from tracing.instrumentation._otel import PinnedIds, pinned_ids

pytestmark = pytest.mark.sdk_contract
VERSION = _sdk.sdk_version()


class Collect(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


@pytest.fixture
def wired() -> Iterator[tuple[Langfuse, Collect, str]]:
    key = f"pk-lf-contract-{uuid.uuid4().hex[:8]}"
    exporter = Collect()
    client = Langfuse(public_key=key, secret_key="sk", base_url="http://127.0.0.1:9",
                      tracer_provider=TracerProvider(), span_exporter=exporter)
    try:
        yield client, exporter, key
    finally:
        _sdk.forget_client(key)


def contract(condition: Any, what: str) -> None:
    assert condition, f"langfuse {VERSION}: {what} (see tracing/_sdk.py)"


def test_sdk_version_is_supported():
    """The installed SDK passes the same check instrument() makes."""
    _sdk.check_sdk()


def test_unsupported_version_is_refused_by_name(monkeypatch):
    """A langfuse outside 5.x is refused with its version and the supported range."""
    monkeypatch.setattr(_sdk, "sdk_version", lambda: "6.1.0")
    with pytest.raises(_sdk.LangfuseWiringError, match=r"langfuse 6\.1\.0.*>=5\.0,<6"):
        _sdk.check_sdk()


def test_resource_manager_registry(wired):
    """`LangfuseResourceManager._instances` says a client exists for a key, and forgets it."""
    _, _, key = wired
    contract(_sdk.client_exists(key), "_instances does not hold the new client")
    contract(_sdk.tracer_provider_of(key) is not None, "the manager has no tracer_provider")


def test_span_processor_is_found_and_put_behind_ours(wired):
    """The SDK's processor is on the provider's processor tuple; ours can go first."""
    _, _, key = wired
    provider = _sdk.tracer_provider_of(key)
    processor = _sdk.langfuse_processor(provider, key)
    from opentelemetry.sdk.trace import SpanProcessor

    marker = SpanProcessor()
    _sdk.put_processor_first(provider, marker)
    contract(_sdk.span_processors(provider)[0] is marker, "_span_processors is not a tuple")
    contract(processor in _sdk.span_processors(provider), "the SDK processor is gone")


def test_batch_exporter_redirect(wired):
    """The processor's batch exporter and schedule delay can be replaced."""
    client, _, key = wired
    processor = _sdk.langfuse_processor(_sdk.tracer_provider_of(key), key)
    other = Collect()
    transformer = _sdk.redirect_batch(processor, other, 0.5)
    target = transformer if transformer is not None else None
    if target is not None:
        contract(_sdk.transformer_masks(target) in (True, False), "_mask_otel_spans is gone")
    client.start_observation(name="x").end()
    processor.force_flush()
    contract([s.name for s in other.spans] == ["x"], "spans did not reach the new exporter")
    contract(processor._batch_processor._schedule_delay == 0.5, "_schedule_delay is gone")


def test_observation_otel_span(wired):
    """An SDK observation exposes its OpenTelemetry span."""
    client, _, _ = wired
    observation = client.start_observation(name="x")
    span = _sdk.otel_span(observation)
    contract(span.get_span_context().span_id == int(observation.id, 16),
             "_otel_span is not the observation's span")
    observation.end()


def test_set_parent_changes_the_exported_parent(wired):
    """Re-parenting a live span changes the parent it is exported with."""
    client, exporter, _ = wired
    parent = client.start_observation(name="parent")
    child = client.start_observation(name="child")
    _sdk.set_parent(_sdk.otel_span(child), _sdk.otel_span(parent).get_span_context())
    child.end()
    parent.end()
    client.flush()
    [exported] = [s for s in exporter.spans if s.name == "child"]
    contract(exported.parent is not None
             and exported.parent.span_id == int(parent.id, 16), "Span._parent is gone")


def test_attribute_names_and_root_claim_key():
    """The attribute names the task span is written with are the SDK's."""
    names = _sdk.attribute_names()
    contract(names.OBSERVATION_INPUT == "langfuse.observation.input", "input attribute")
    contract(names.IS_APP_ROOT == "langfuse.internal.is_app_root", "app-root attribute")
    contract(_sdk.root_claim_baggage_key() == "langfuse_trace_id", "root-claim baggage key")


def test_pinned_ids_make_a_parentless_span_with_a_chosen_trace_id(wired):
    """The task tracer starts a parentless span with the pinned trace and span ids, and the
    SDK's processor exports it as a Langfuse span."""
    client, exporter, key = wired
    tracer = task_tracer(key)
    contract(isinstance(tracer.id_generator, PinnedIds), "the tracer has no id_generator")
    with pinned_ids(0xABC, 0xDEF):
        span = tracer.start_span("root", context=otel_context.Context())
    span.end()
    client.flush()
    [exported] = [s for s in exporter.spans if s.name == "root"]
    contract(exported.parent is None, "the root has a parent")
    contract((exported.context.trace_id, exported.context.span_id) == (0xABC, 0xDEF),
             "the pinned ids were not used")


def test_bound_public_key_picks_the_client_of_get_client(wired):
    """With two clients in the process, get_client() returns the bound key's client (not the
    disabled one it gives when it cannot tell), and the binding undoes cleanly."""
    from langfuse import get_client

    client, exporter, key = wired
    other = f"pk-lf-contract-{uuid.uuid4().hex[:8]}"
    Langfuse(public_key=other, secret_key="sk", base_url="http://127.0.0.1:9",
             tracer_provider=TracerProvider(), span_exporter=Collect())
    try:
        token = _sdk.bind_public_key(key)
        try:
            with get_client().start_as_current_observation(name="bound"):
                pass
        finally:
            _sdk.unbind_public_key(token)
        client.flush()
        contract([s.name for s in exporter.spans] == ["bound"],
                 "get_client._current_public_key no longer picks the client")
    finally:
        _sdk.forget_client(other)


def test_media_router_reports_a_failed_spool_write():
    """A span batch whose spool write failed is never reported as exported."""
    class Failing(Collect):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.FAILURE

    class Transformer:
        _mask_otel_spans = None

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    plain = provider.get_tracer("t").start_span("plain")
    plain.end()
    media = provider.get_tracer("t").start_span("media", attributes={"in": "data:image/png"})
    media.end()
    router = MediaRouter(Transformer(), Failing())
    assert router.export([plain, media]) == SpanExportResult.FAILURE  # type: ignore[list-item]


def test_replace_batch_moves_queued_spans_and_ends_the_old_thread(wired):
    """The processor's batch can be replaced: spans it queued reach its exporter first, its
    thread ends, and later spans go to the new batch."""
    from tracing.instrumentation._pipeline import SpoolBatch

    client, exporter, key = wired
    processor = _sdk.langfuse_processor(_sdk.tracer_provider_of(key), key)
    old = processor._batch_processor
    client.start_observation(name="queued").end()
    other = Collect()
    batch = _sdk.replace_batch(processor, SpoolBatch(other))
    contract(processor._batch_processor is batch, "_batch_processor cannot be replaced")
    contract([s.name for s in exporter.spans] == ["queued"], "queued spans were not exported")
    contract(not old._worker_thread.is_alive(), "the old batch's thread still runs")
    client.start_observation(name="later").end()
    contract([s.name for s in other.spans] == ["later"], "the new batch did not get the span")


def test_span_limits_of_a_provider():
    """A provider's span limits are readable, so task spans get the same ones."""
    from opentelemetry.sdk.trace import SpanLimits

    limits = SpanLimits(max_attributes=7)
    contract(_sdk.span_limits_of(TracerProvider(span_limits=limits)) is limits,
             "TracerProvider._span_limits is gone")


def test_a_context_made_in_one_step_is_the_one_three_copies_make():
    """``_sdk.context_with`` gives the same current span, baggage and values as
    ``set_span_in_context`` + ``set_baggage`` + ``set_value``."""
    from opentelemetry import baggage
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    span = NonRecordingSpan(SpanContext(1, 2, False))
    key = otel_context.create_key("contract")
    made = _sdk.context_with(span, {"claim": "x"}, **{key: "v"})
    stepwise = otel_context.set_value(key, "v", baggage.set_baggage(
        "claim", "x", otel_trace.set_span_in_context(span, otel_context.Context())))
    assert made == stepwise, f"the OpenTelemetry context keys changed ({_sdk.sdk_version()})"
    assert otel_trace.get_current_span(made) is span
    assert baggage.get_all(made) == {"claim": "x"} and otel_context.get_value(key, made) == "v"

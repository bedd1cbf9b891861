"""Compact span records: the shipper's OTLP is OpenTelemetry's own, and old records still ship."""

from __future__ import annotations

import marshal

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from tracing.spool import scan
from tracing.spool._spanrecord import (
    BODY_COMPACT,
    BODY_OTLP,
    compact_span_record,
    encode_record,
    otlp_batch,
    otlp_request,
    otlp_span,
)

TRACE, SPAN, PARENT = 0xABCDEF0123456789ABCDEF0123456789, 0x1122334455667788, 0x99AA
RESOURCE = Resource({"service.name": "worker", "telemetry.sdk.version": "1.45.2",
                     "pid": 4242, "ratio": 0.5})


def span(**overrides: object) -> ReadableSpan:
    """A ReadableSpan like the SDK's task observation, with ``overrides``."""
    fields: dict[str, object] = dict(
        name="t.generate",
        context=SpanContext(TRACE, SPAN, False, TraceFlags(1)),
        parent=SpanContext(TRACE, PARENT, False, TraceFlags(1)),
        resource=RESOURCE,
        attributes={"langfuse.observation.type": "span", "langfuse.observation.input":
                    '{"args": [1]}', "flag": True, "off": False, "n": -7, "zero": 0,
                    "x": 1.25, "tags": ("a", "b"), "nums": (1, 2, 3), "empty": "",
                    "unicode": "é ✓ 雪"},
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.UNSET),
        start_time=1_700_000_000_000_000_000,
        end_time=1_700_000_000_123_456_789,
        instrumentation_scope=InstrumentationScope("langfuse-sdk", "5.0.4", None,
                                                   {"public_key": "pk-lf-x"}),
    )
    fields.update(overrides)
    return ReadableSpan(**fields)  # type: ignore[arg-type]


CASES = {
    "task": span(),
    "root": span(parent=None),
    "remote parent": span(parent=SpanContext(TRACE, PARENT, True, TraceFlags(1))),
    "error": span(status=Status(StatusCode.ERROR, "ValueError: boom"), kind=SpanKind.CLIENT),
    "ok": span(status=Status(StatusCode.OK)),
    "events and links": span(
        events=[Event("exception", {"exception.type": "ValueError"}, 1_700_000_000_000_000_001)],
        links=[Link(SpanContext(TRACE, 0x77, True, TraceFlags(1)), {"why": "retry"})]),
    "trace state": span(context=SpanContext(TRACE, SPAN, False, TraceFlags(1),
                                            TraceState([("lf", "1"), ("vendor", "x")]))),
    "no scope, no attributes": span(instrumentation_scope=None, attributes={}),
    "schema urls": span(resource=Resource({"a": 1}, "https://schema/r"),
                        instrumentation_scope=InstrumentationScope("s", None, "https://schema/s")),
    "big ints": span(attributes={"big": 2**62, "small": -(2**62)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compact_record_ships_as_opentelemetrys_own_otlp(name):
    """Decoding a compact record gives exactly the request OpenTelemetry's encoder builds."""
    sdk_span = CASES[name]
    payload = encode_record(sdk_span)
    assert payload[:8] == SPAN.to_bytes(8, "big") and payload[8:24] == TRACE.to_bytes(16, "big")
    assert payload[24] == BODY_COMPACT
    ours = ExportTraceServiceRequest.FromString(otlp_request(payload))
    assert ours == encode_spans([sdk_span])


@pytest.mark.parametrize("name", ["task", "root", "error", "trace state"])
def test_a_record_written_from_its_fields_ships_as_the_spans_own(name):
    """``compact_span_record`` (a writer without a span: the canvas root) given a span's
    17 fields makes a frame whose OTLP is OpenTelemetry's for that span; any other number
    of fields is refused."""
    sdk_span = CASES[name]
    fields = marshal.loads(encode_record(sdk_span)[25:])
    [record] = scan(compact_span_record(TRACE, SPAN, fields)).records
    ours = ExportTraceServiceRequest.FromString(otlp_request(record.payload))
    assert ours == encode_spans([sdk_span])
    with pytest.raises(ValueError, match="17 fields"):
        compact_span_record(TRACE, SPAN, fields[:16])


def test_old_otlp_records_pass_through_unchanged():
    """A version-1 record (OTLP body, written before the upgrade) is sent byte for byte."""
    sdk_span = CASES["task"]
    otlp = encode_spans([sdk_span]).SerializeToString()
    assert otlp[0] == BODY_OTLP
    payload = SPAN.to_bytes(8, "big") + TRACE.to_bytes(16, "big") + otlp
    assert otlp_request(payload) == otlp


def test_concatenated_requests_parse_as_one_batch():
    """Compact and old records concatenated make one request holding every span."""
    bodies = [otlp_request(encode_record(s)) for s in CASES.values()]
    bodies.append(encode_spans([CASES["task"]]).SerializeToString())
    merged = ExportTraceServiceRequest.FromString(b"".join(bodies))
    spans = [s for rs in merged.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(spans) == len(CASES) + 1


def test_a_batch_is_opentelemetrys_own_request_for_those_spans():
    """A batch of compact records encodes each resource and scope once, grouping the spans
    under them exactly as OpenTelemetry's encoder does for the same spans."""
    sdk_spans = [CASES["task"], CASES["schema urls"], CASES["root"],
                 CASES["no scope, no attributes"], CASES["error"], CASES["schema urls"]]
    ours = otlp_batch([otlp_span(encode_record(s)) for s in sdk_spans])
    assert ExportTraceServiceRequest.FromString(ours) == encode_spans(sdk_spans)
    assert len(ours) < len(b"".join(otlp_request(encode_record(s)) for s in sdk_spans))


def test_a_batch_appends_old_records_whole():
    """Version-1 records in a batch are appended as their own requests, beside the grouped
    compact ones: every span is in the one request."""
    old = encode_spans([CASES["task"]]).SerializeToString()
    payloads = [encode_record(CASES["root"]), SPAN.to_bytes(8, "big") + TRACE.to_bytes(
        16, "big") + old, encode_record(CASES["error"])]
    merged = ExportTraceServiceRequest.FromString(otlp_batch([otlp_span(p) for p in payloads]))
    expected = encode_spans([CASES["root"], CASES["error"]])
    expected.MergeFromString(old)
    assert merged == expected


def test_an_undecodable_compact_body_raises_value_error():
    """A compact body that does not decode is reported (to be dead-lettered), not sent."""
    ids = bytes(24)
    for body in (b"\x02", b"\x02garbage", b"\x02" + marshal.dumps((1, 2), 4)):
        with pytest.raises(ValueError, match="undecodable"):
            otlp_request(ids + body)


def test_a_value_marshal_refuses_falls_back_to_otlp():
    """A span attribute marshal cannot write is recorded as a version-1 (OTLP) record."""
    class Odd(str):
        pass

    sdk_span = span(attributes={"odd": Odd("x")})
    payload = encode_record(sdk_span)
    assert payload[24] == BODY_OTLP
    assert ExportTraceServiceRequest.FromString(otlp_request(payload)) == encode_spans([sdk_span])

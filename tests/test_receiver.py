"""The loopback Langfuse receiver in tracing.testing, driven by the real SDK and raw HTTP."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langfuse import Langfuse, propagate_attributes
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.trace import TracerProvider

from tracing.testing import LangfuseReceiver, Observation, langfuse_receiver, receiver_env

__all__ = ["langfuse_receiver"]  # the public fixture, used by a test below

ROOT = Path(__file__).resolve().parent.parent
PROTOBUF = {"Content-Type": "application/x-protobuf"}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def receiver() -> Iterator[LangfuseReceiver]:
    """A started receiver whose keys are unique to the test (one SDK client per key)."""
    suffix = uuid.uuid4().hex[:10]
    with LangfuseReceiver(public_key=f"pk-lf-{suffix}", secret_key=f"sk-lf-{suffix}") as r:
        yield r


@pytest.fixture
def client(receiver: LangfuseReceiver) -> Iterator[Langfuse]:
    """A real Langfuse SDK client pointed at the receiver, on a private tracer provider."""
    provider = TracerProvider()
    langfuse = Langfuse(
        public_key=receiver.public_key,
        secret_key=receiver.secret_key,
        base_url=receiver.base_url,
        tracer_provider=provider,
        flush_interval=0.2,
    )
    yield langfuse
    langfuse.shutdown()
    provider.shutdown()


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def make_batch(*spans: dict[str, Any]) -> ExportTraceServiceRequest:
    """An OTLP request holding the given spans (keys: name, trace_id, span_id, parent, ...)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=_value("receiver-test"))
    )
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "langfuse-sdk"
    for index, spec in enumerate(spans):
        span = scope_spans.spans.add()
        span.name = spec.get("name", f"span-{index}")
        span.trace_id = spec.get("trace_id", bytes.fromhex("ab" * 16))
        span.span_id = spec.get("span_id", (index + 1).to_bytes(8, "big"))
        if spec.get("parent"):
            span.parent_span_id = spec["parent"]
        span.start_time_unix_nano = spec.get("start", 1_700_000_000_000_000_000 + index)
        span.end_time_unix_nano = spec.get("end", span.start_time_unix_nano + 2_000_000)
        if "status" in spec:
            code, message = spec["status"]
            span.status.CopyFrom(Status(code=code, message=message))
        for key, value in spec.get("attributes", {}).items():
            span.attributes.append(KeyValue(key=key, value=_value(value)))
    return request


def post(
    receiver: LangfuseReceiver,
    body: bytes,
    headers: dict[str, str] | None = None,
    auth: bool = True,
) -> httpx.Response:
    """POST raw bytes to the receiver's OTLP endpoint, as the SDK would."""
    sent = {**PROTOBUF, "x-langfuse-ingestion-version": "4"}
    if auth:
        sent["Authorization"] = receiver.auth_header()
    sent.update(headers or {})
    return httpx.post(receiver.traces_url, content=body, headers=sent, timeout=10)


# --------------------------------------------------------------------------- the real SDK


def test_sdk_spans_are_decoded_by_langfuse_attribute_names(
    receiver: LangfuseReceiver, client: Langfuse
) -> None:
    """Spans the real SDK exports arrive decoded: names, parents, types, levels, usage, trace."""
    with (
        propagate_attributes(
            user_id="user-1",
            session_id="session-1",
            tags=["batch", "nightly"],
            trace_name="summarize-job",
            metadata={"tenant": "acme"},
        ),
        client.start_as_current_observation(
            name="summarize", input={"doc": "hello"}, metadata={"queue": "llm", "attempt": 1}
        ) as task,
    ):
        with client.start_as_current_observation(
            name="llm-call",
            as_type="generation",
            model="offline-1",
            usage_details={"input": 12, "output": 5, "total": 17},
            cost_details={"total": 0.0025},
        ) as generation:
            generation.update(output="a summary")
        with client.start_as_current_observation(name="post-process") as failing:
            failing.update(level="ERROR", status_message="ValueError: boom")
        task.update(output={"summary": "a summary"})
    client.flush()

    observations = receiver.wait_for_count(3, timeout=10)
    by_name = {o.name: o for o in observations}
    root, gen, bad = by_name["summarize"], by_name["llm-call"], by_name["post-process"]

    assert root.is_root and root.parent_observation_id is None
    assert gen.parent_observation_id == root.id and bad.parent_observation_id == root.id
    assert {o.trace_id for o in observations} == {root.trace_id}
    assert (root.type, gen.type, bad.type) == ("span", "generation", "span")
    assert root.input == {"doc": "hello"} and root.output == {"summary": "a summary"}
    # Langfuse v4 merges the propagated trace metadata into every observation's metadata.
    assert root.metadata == {"queue": "llm", "attempt": 1, "tenant": "acme"}
    assert gen.model == "offline-1" and gen.output == "a summary"
    assert gen.usage_details == {"input": 12, "output": 5, "total": 17}
    assert gen.cost_details == {"total": 0.0025}
    assert (bad.level, bad.status_message) == ("ERROR", "ValueError: boom")
    assert root.level == gen.level == "DEFAULT"
    for obs in observations:
        assert obs.user_id == "user-1" and obs.session_id == "session-1"
        assert obs.tags == ["batch", "nightly"] and obs.trace_name == "summarize-job"
        assert obs.trace_metadata == {"tenant": "acme"} and obs.metadata["tenant"] == "acme"
        assert obs.end_time is not None and obs.end_time >= obs.start_time
    assert receiver.duplicates() == {}

    trace = receiver.trace(root.trace_id)
    assert (trace.name, trace.input, trace.output) == (
        "summarize-job", {"doc": "hello"}, {"summary": "a summary"}
    )
    assert trace.roots == (root,) and trace.root == root
    tree = receiver.tree(root.trace_id)
    lines = tree.splitlines()
    assert "user=user-1" in lines[0] and "summarize-job" in lines[0]
    assert lines[1] == '  input:  {"doc": "hello"}'
    assert lines[2] == '  output: {"summary": "a summary"}'
    assert lines[3].startswith("└─ summarize [span] DEFAULT")
    assert "llm-call [generation]" in lines[4] and "input=12 output=5 total=17" in lines[4]
    assert "cost=$0.002500" in lines[4]
    assert "post-process [span] ERROR" in lines[5] and "ValueError: boom" in lines[5]

    [request] = receiver.trace_requests
    assert request.status == 200 and request.span_count == 3
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["x-langfuse-ingestion-version"] == "4"


def test_sdk_scores_and_auth_check_reach_the_receiver(
    receiver: LangfuseReceiver, client: Langfuse
) -> None:
    """Langfuse v5's auth_check and create_score (batched POST /api/public/scores) succeed."""
    assert client.auth_check() is True
    trace_id = Langfuse.create_trace_id(seed="score-test")
    client.create_score(name="quality", value=0.9, trace_id=trace_id, comment="fine")
    client.flush()

    [score] = receiver.wait_for_scores(1, timeout=10)
    assert score["name"] == "quality" and score["value"] == 0.9
    assert score["traceId"] == trace_id and score["comment"] == "fine"
    statuses = {r.path: r.status for r in receiver.requests}
    assert statuses["/api/public/scores"] == 202
    assert statuses["/api/public/projects"] == 200


def test_langfuse_receiver_fixture_gives_unique_keys_and_env(
    langfuse_receiver: LangfuseReceiver,
) -> None:
    """The public fixture yields a running receiver with test-unique keys and env vars."""
    env = receiver_env(langfuse_receiver)
    assert env["LANGFUSE_BASE_URL"] == f"http://127.0.0.1:{langfuse_receiver.port}"
    assert env["LANGFUSE_PUBLIC_KEY"].startswith("pk-lf-test-")
    assert env["LANGFUSE_SECRET_KEY"] == langfuse_receiver.secret_key
    health = httpx.get(langfuse_receiver.base_url + "/api/public/health", timeout=5)
    assert health.json() == {"status": "OK", "version": "4.16.0"}


# --------------------------------------------------------------------------- protocol rules


def test_missing_or_wrong_keys_get_401_and_nothing_is_stored(receiver: LangfuseReceiver) -> None:
    """Requests without Basic auth or with other keys get 401 JSON; rotation moves the keys."""
    body = make_batch({"name": "a"}).SerializeToString()
    missing = post(receiver, body, auth=False)
    wrong = post(receiver, body, headers={"Authorization": "Basic " + "eDp5"})  # x:y
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert "message" in missing.json() and "message" in wrong.json()
    projects = httpx.get(receiver.base_url + "/api/public/projects", timeout=5)
    assert projects.status_code == 401

    old_auth = receiver.auth_header()
    receiver.set_auth_keys("pk-lf-rotated", "sk-lf-rotated")
    assert post(receiver, body, headers={"Authorization": old_auth}).status_code == 401
    assert receiver.observations == []
    assert post(receiver, body).status_code == 200  # post() uses the current keys
    assert [o.name for o in receiver.observations] == ["a"]


def test_batch_with_a_span_lacking_an_id_is_rejected_whole(receiver: LangfuseReceiver) -> None:
    """One span without a span id (or trace id) makes the whole batch 400, none stored."""
    good = {"name": "good"}
    no_span = make_batch(good, {"name": "bad", "span_id": b""}).SerializeToString()
    no_trace = make_batch(good, {"name": "bad", "trace_id": b""}).SerializeToString()

    for body, reason in ((no_span, "spanId:absent"), (no_trace, "traceId:absent")):
        response = post(receiver, body)
        assert response.status_code == 400
        assert reason in response.json()["error"]
        assert "1 of 2 span(s)" in response.json()["error"]
    assert receiver.observations == []
    assert [r.span_count for r in receiver.trace_requests] == [2, 2]


def test_present_ids_are_accepted_whatever_their_bytes(receiver: LangfuseReceiver) -> None:
    """An all-zero span id is present, so v4.16's validateOtelSpanIds lets it through (200)."""
    body = make_batch({"name": "zero", "span_id": bytes(8)}).SerializeToString()
    assert post(receiver, body).status_code == 200
    assert [o.id for o in receiver.observations] == ["0" * 16]


def test_a_request_without_resource_spans_is_answered_empty(receiver: LangfuseReceiver) -> None:
    """No resourceSpans: the route answers 200 ``{}`` before any id or version check."""
    response = post(receiver, b"", headers={"x-langfuse-ingestion-version": "9"})
    assert (response.status_code, response.json()) == (200, {})
    assert receiver.observations == []


def test_ingestion_version_above_four_is_rejected(receiver: LangfuseReceiver) -> None:
    """An x-langfuse-ingestion-version above 4 answers 400, as Langfuse does."""
    body = make_batch({"name": "a"}).SerializeToString()
    response = post(receiver, body, headers={"x-langfuse-ingestion-version": "5"})
    assert response.status_code == 400
    assert "x-langfuse-ingestion-version" in response.json()["error"]
    assert receiver.observations == []


def test_gzip_and_otlp_json_bodies_are_accepted(receiver: LangfuseReceiver) -> None:
    """Gzip protobuf and OTLP/JSON (hex ids) are both decoded; a corrupt gzip body is a 400."""
    body = make_batch({"name": "zipped"}).SerializeToString()
    response = post(receiver, gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200 and response.json()["name"] == "otel-ingestion-job"
    broken = post(receiver, b"not gzip", headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400
    assert broken.json() == {"error": "Failed to decompress request body"}

    document = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "scope": {"name": "json-scope"},
                        "spans": [
                            {
                                "traceId": "cd" * 16,
                                "spanId": "00000000000000aa",
                                "name": "from-json",
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000000005000000",
                            }
                        ],
                    }
                ]
            }
        ]
    }
    response = post(
        receiver, json.dumps(document).encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    zipped, from_json = receiver.observations
    assert zipped.name == "zipped"
    assert (from_json.name, from_json.id, from_json.trace_id) == (
        "from-json",
        "00000000000000aa",
        "cd" * 16,
    )
    assert from_json.duration_ms == pytest.approx(5.0)


def test_oversized_body_gets_413() -> None:
    """A request body above max_request_bytes answers 413 and stores nothing."""
    small = LangfuseReceiver(public_key="pk-small", max_request_bytes=200)
    with small:
        big = make_batch({"name": "x", "attributes": {"blob": "y" * 500}}).SerializeToString()
        assert post(small, big).status_code == 413
        assert small.observations == []
        assert post(small, make_batch({"name": "ok"}).SerializeToString()).status_code == 200


def test_attribute_decoding_rules(receiver: LangfuseReceiver) -> None:
    """Both metadata forms merge, status code 2 means ERROR, is_app_root marks a root."""
    body = make_batch(
        {
            "name": "child-as-root",
            "parent": bytes.fromhex("00000000000000ff"),
            "status": (2, "otel says no"),
            "attributes": {
                "langfuse.internal.is_app_root": True,
                "langfuse.observation.metadata": '{"a": 1}',
                "langfuse.observation.metadata.b": '"two"',
                "langfuse.observation.metadata.c": "not json",
                "langfuse.observation.input": "plain text",
                "langfuse.environment": "staging",
                "langfuse.trace.tags": '["x", "y"]',
                "custom.list": [1, 2, 3],
            },
        },
        {
            "name": "warned",
            "parent": bytes.fromhex("00000000000000ff"),
            "attributes": {"langfuse.observation.level": "WARNING",
                           "langfuse.internal.as_root": True},  # not a v4 root flag
        },
    ).SerializeToString()
    assert post(receiver, body).status_code == 200
    first, second = receiver.observations

    assert first.is_root and first.parent_observation_id == "00000000000000ff"
    assert (first.level, first.status_message) == ("ERROR", "otel says no")
    assert first.metadata == {"a": 1, "b": "two", "c": "not json"}
    assert first.input == "plain text" and first.environment == "staging"
    assert first.tags == ["x", "y"] and first.attributes["custom.list"] == [1, 2, 3]
    assert first.resource_attributes == {"service.name": "receiver-test"}
    assert (second.level, second.type, second.environment) == ("WARNING", "span", "default")
    assert not second.is_root
    tree = receiver.tree(first.trace_id)
    assert "child-as-root [span] ERROR 2 ms \"otel says no\" (app root)" in tree
    assert "warned [span] WARNING 2 ms (parent 00000000000000ff not received)" in tree


# --------------------------------------------------------------------------- faults


def test_fail_next_answers_with_status_and_retry_after(receiver: LangfuseReceiver) -> None:
    """fail_next(n, 429, retry_after) answers n trace POSTs with 429 + Retry-After, then 200."""
    receiver.fail_next(2, 429, retry_after=3)
    body = make_batch({"name": "a"}).SerializeToString()
    responses = [post(receiver, body) for _ in range(3)]

    assert [r.status_code for r in responses] == [429, 429, 200]
    assert [r.headers.get("Retry-After") for r in responses[:2]] == ["3", "3"]
    assert "message" in responses[0].json()
    assert [r.status for r in receiver.trace_requests] == [429, 429, 200]
    assert len(receiver.observations) == 1


def test_fail_rate_is_reproducible_with_a_seed(receiver: LangfuseReceiver) -> None:
    """set_fail_rate with the same seed fails the same requests each time."""
    body = make_batch({"name": "a", "span_id": b"\x00" * 7 + b"\x01"}).SerializeToString()

    def run() -> list[int]:
        receiver.set_fail_rate(0.5, status=503, seed=42)
        return [post(receiver, body).status_code for _ in range(12)]

    first, second = run(), run()
    assert first == second
    assert set(first) == {200, 503}
    receiver.reset_faults()
    assert post(receiver, body).status_code == 200


def test_poison_predicate_rejects_the_whole_batch(receiver: LangfuseReceiver) -> None:
    """A batch holding a span the poison predicate matches answers 400 and stores nothing."""
    receiver.set_poison(lambda span: span["name"] == "poison")
    mixed = make_batch({"name": "fine"}, {"name": "poison"}).SerializeToString()
    response = post(receiver, mixed)
    assert response.status_code == 400 and "poison" in response.json()["error"]
    assert receiver.observations == []
    assert post(receiver, make_batch({"name": "fine"}).SerializeToString()).status_code == 200


def test_stop_and_start_rebind_the_same_port(receiver: LangfuseReceiver) -> None:
    """down() refuses connections (even pooled keep-alive ones); up() serves the same port."""
    port = receiver.port
    body = make_batch({"name": "a"}).SerializeToString()
    headers = {**PROTOBUF, "Authorization": receiver.auth_header()}
    with httpx.Client(timeout=5) as http:
        assert http.post(receiver.traces_url, content=body, headers=headers).status_code == 200
        receiver.down()
        assert not receiver.running
        with pytest.raises(httpx.TransportError):
            http.post(receiver.traces_url, content=body, headers=headers)
        with pytest.raises(httpx.ConnectError):
            httpx.post(receiver.traces_url, content=body, headers=headers, timeout=5)
        receiver.up()
        assert receiver.port == port
        assert http.post(receiver.traces_url, content=body, headers=headers).status_code == 200
    assert receiver.duplicates() == {"0000000000000001": 2}


def test_down_drops_a_request_in_flight_without_storing_it(receiver: LangfuseReceiver) -> None:
    """A request waiting out injected latency when the receiver goes down gets no answer."""
    receiver.set_latency(30)
    outcome: list[BaseException | httpx.Response] = []
    body = make_batch({"name": "in-flight"}).SerializeToString()

    def send() -> None:
        try:
            outcome.append(post(receiver, body))
        except httpx.TransportError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    receiver.wait_for_in_flight(1, timeout=5)
    started = time.monotonic()
    receiver.down()
    sender.join(timeout=10)
    assert time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError)
    assert receiver.observations == []


def test_latency_delays_answers(receiver: LangfuseReceiver) -> None:
    """set_latency holds each trace answer back for at least that long."""
    receiver.set_latency(0.3)
    started = time.monotonic()
    assert post(receiver, make_batch({"name": "slow"}).SerializeToString()).status_code == 200
    assert time.monotonic() - started >= 0.3


# --------------------------------------------------------------------------- queries


def test_duplicates_are_detected(receiver: LangfuseReceiver) -> None:
    """The same span id accepted twice shows up in duplicates(), by id, and in the tree."""
    body = make_batch({"name": "root"}, {"name": "child", "parent": (1).to_bytes(8, "big")})
    raw = body.SerializeToString()
    assert post(receiver, raw).status_code == 200
    assert post(receiver, make_batch({"name": "root"}).SerializeToString()).status_code == 200

    root_id = "0000000000000001"
    assert receiver.duplicates() == {root_id: 2}
    assert [len(v) for v in receiver.observations_by_id().values()] == [2, 1]
    assert len(receiver.traces()["ab" * 16]) == 3
    tree = receiver.tree("ab" * 16)
    assert "root [span] DEFAULT 2 ms DUPLICATE x2" in tree
    assert "   └─ child [span]" in tree
    assert [o.name for o in receiver.find(name="child", type="span", level="DEFAULT")] == ["child"]


def test_wait_for_times_out_with_a_clear_message(receiver: LangfuseReceiver) -> None:
    """wait_for raises AssertionError naming what it waited for and summarising arrivals."""
    assert post(receiver, make_batch({"name": "only-one"}).SerializeToString()).status_code == 200
    with pytest.raises(AssertionError) as excinfo:
        receiver.wait_for_count(2, name="only-one", timeout=0.2)
    message = str(excinfo.value)
    assert "timed out after 0.2s waiting for 2 observation(s) named 'only-one'" in message
    assert "received 1 observation(s)" in message and "only-one x1" in message
    assert "HTTP 200 x1" in message and "only-one [span]" in message


def test_wait_for_wakes_when_spans_arrive(receiver: LangfuseReceiver) -> None:
    """wait_for returns as soon as a matching span is stored by another thread."""
    body = make_batch({"name": "late"}).SerializeToString()
    timer = threading.Timer(0.1, lambda: post(receiver, body))
    timer.start()
    try:
        observations = receiver.wait_for(
            lambda obs: any(o.name == "late" for o in obs), timeout=10, what="'late'"
        )
    finally:
        timer.join()
    assert [o.name for o in observations] == ["late"]
    assert isinstance(observations[0], Observation)
    receiver.clear()
    assert receiver.observations == [] and receiver.requests == []


def test_legacy_ingestion_scores_are_recorded(receiver: LangfuseReceiver) -> None:
    """score-create events land in scores (201); v4's events_only mode refuses the rest (400)."""
    at = "2026-11-30T00:00:00.000Z"
    batch = {
        "batch": [
            {"id": "e1", "type": "score-create", "timestamp": at,
             "body": {"name": "s", "value": 1}},
            {"id": "e2", "type": "trace-create", "timestamp": at, "body": {"id": "t"}},
            {"id": "e3", "type": "score-create", "body": {"name": "no timestamp", "value": 1}},
        ]
    }
    response = httpx.post(
        receiver.base_url + "/api/public/ingestion",
        json=batch,
        headers={"Authorization": receiver.auth_header()},
        timeout=5,
    )
    assert response.status_code == 207
    assert response.json()["successes"] == [{"id": "e1", "status": 201}]
    errors = {e["id"]: e for e in response.json()["errors"]}
    assert errors["e2"]["status"] == 400 and errors["e2"]["message"] == "Event type not accepted"
    assert errors["e3"]["status"] == 400 and errors["e3"]["message"] == "Invalid request data"
    assert receiver.scores == [{"name": "s", "value": 1}]
    assert len(receiver.ingestion_events) == 3


# --------------------------------------------------------------------------- standalone


def test_standalone_receiver_serves_trees_and_exits_on_sigterm() -> None:
    """python -m tracing.testing prints its URL, serves /_receiver/* and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tracing.testing", "--port", "0", "--public-key", "pk-lf-cli"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        base_url = line.removeprefix("listening on ")
        cli = LangfuseReceiver(public_key="pk-lf-cli", port=int(base_url.rsplit(":", 1)[1]))
        response = httpx.post(
            base_url + "/api/public/otel/v1/traces",
            content=make_batch({"name": "via-cli"}).SerializeToString(),
            headers={**PROTOBUF, "Authorization": cli.auth_header()},
            timeout=5,
        )
        assert response.status_code == 200
        [observation] = httpx.get(base_url + "/_receiver/observations", timeout=5).json()
        assert observation["name"] == "via-cli"
        assert observation["start_time"].startswith("2023-11-14T22:13:20")
        assert "via-cli [span]" in httpx.get(base_url + "/_receiver/tree", timeout=5).text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

"""Durable scores, unit by unit: the score record, the 207 verdicts with a scripted transport
(``httpx.MockTransport``) and a fake clock, the shipper's split of spans and scores, and
``score_task``'s call path. No sockets (but the last row's receiver), no sleeps."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tracing
from tracing import load_config
from tracing._config import Config
from tracing.instrumentation import _instrument, _producer, _runtime, _scores
from tracing.shipping._delivery import SendResult, Verdict, event_results, event_verdict
from tracing.shipping._reader import SpoolReader
from tracing.shipping._score_sending import ScoreSender, ingestion_transport
from tracing.shipping._sending import BatchSender
from tracing.shipping._status import ShipperStats
from tracing.shipping._transport import HttpTransport
from tracing.spool import (
    KIND_SCORE,
    SegmentWriter,
    encode_frame,
    list_segments,
    read_cursor,
    read_dead_letters,
    scan_file,
)
from tracing.spool._score_record import encode_event, event_id_of, score_event, score_id_for
from tracing.testing import LangfuseReceiver

TRACE = "0123456789abcdef0123456789abcdef"
Handler = Callable[[httpx.Request], httpx.Response]


def lowest(a: float, b: float) -> float:
    """A random source that always draws the low end."""
    return a


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(environ={
        "LANGFUSE_PUBLIC_KEY": "pk-lf-test", "LANGFUSE_SECRET_KEY": "sk-lf-test",
        "LANGFUSE_BASE_URL": "http://langfuse.test", "CELERY_LANGFUSE_SPOOL_DIR":
        str(tmp_path / "spool"), "CELERY_LANGFUSE_AUTH_RETRY_INTERVAL": "30",
    })


def write_scores(config: Config, names: list[str], writer: SegmentWriter | None = None,
                 ) -> list[dict[str, Any]]:
    """Append one score record per name to the spool, as score_task does; the events."""
    writer = writer or SegmentWriter(config.spool_dir)
    events = [score_event(trace_id=TRACE, name=n, value=1.0) for n in names]
    writer.append(b"".join(encode_frame(KIND_SCORE, encode_event(e)) for e in events))
    return events


class Script:
    """A scripted Langfuse: each request is answered by the next handler; requests kept."""

    def __init__(self, *answers: Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.batches: list[list[dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.batches.append(json.loads(request.content)["batch"])
        return self.answers.pop(0)(request)


def accept_all(request: httpx.Request) -> httpx.Response:
    """207 with every event a success, as Langfuse answers a good batch."""
    batch = json.loads(request.content)["batch"]
    return httpx.Response(207, json={"successes": [{"id": e["id"], "status": 201} for e in batch],
                                     "errors": []})


def per_event(statuses: dict[str, int]) -> Handler:
    """207 where the events whose score name is in ``statuses`` get that status."""
    def answer(request: httpx.Request) -> httpx.Response:
        successes, errors = [], []
        for event in json.loads(request.content)["batch"]:
            status = statuses.get(event["body"]["name"], 201)
            if status < 300:
                successes.append({"id": event["id"], "status": status})
            else:
                errors.append({"id": event["id"], "status": status,
                               "message": "Invalid request data", "error": "bad value"})
        return httpx.Response(207, json={"successes": successes, "errors": errors})
    return answer


def status(code: int, **headers: str) -> Handler:
    return lambda request: httpx.Response(code, json={"message": f"HTTP {code}"}, headers=headers)


def sender_for(config: Config, script: Script, clock: Clock) -> tuple[ScoreSender, SpoolReader]:
    stats = ShipperStats()
    reader = SpoolReader(config.spool_dir, stats)
    transport = ingestion_transport(config, transport=httpx.MockTransport(script))
    return ScoreSender(config, reader, stats, transport=transport, clock=clock,
                       uniform=lowest), reader


def ship(sender: ScoreSender, reader: SpoolReader) -> bool:
    items, _ = reader.next_batch()
    return sender.deliver(items)


def unshipped(config: Config) -> int:
    """Score records past their segment's cursor."""
    return _scores.pending_scores(config.spool_dir)


# --------------------------------------------------------------------------- the record


def test_numeric_categorical_and_boolean_records_match_langfuse_score_body():
    """Each score form becomes a score-create event whose body Langfuse's ScoreBody accepts."""
    numeric = score_event(trace_id=TRACE, name="quality", value=0.8, comment="fine")
    categorical = score_event(trace_id=TRACE, name="verdict", value="good")
    boolean = score_event(trace_id=TRACE, name="thumbs_up", value=True,
                          observation_id="0123456789abcdef")
    explicit = score_event(trace_id=TRACE, name="correct", value=0, data_type="BOOLEAN")
    assert numeric["type"] == "score-create" and numeric["timestamp"].endswith("Z")
    assert numeric["body"] == {"id": score_id_for(TRACE, None, "quality"), "traceId": TRACE,
                               "name": "quality", "value": 0.8, "dataType": "NUMERIC",
                               "comment": "fine"}
    assert categorical["body"]["value"] == "good"
    assert categorical["body"]["dataType"] == "CATEGORICAL"
    assert boolean["body"]["value"] == 1.0 and boolean["body"]["dataType"] == "BOOLEAN"
    assert boolean["body"]["observationId"] == "0123456789abcdef"
    assert explicit["body"]["value"] == 0.0
    assert event_id_of(encode_event(numeric)) == numeric["id"]


def test_score_ids_are_upserts_and_event_ids_are_unique():
    """The same name on the same target keeps one score id; every record has its own event id."""
    first = score_event(trace_id=TRACE, name="quality", value=0.1)
    again = score_event(trace_id=TRACE, name="quality", value=0.9)
    on_observation = score_event(trace_id=TRACE, name="quality", value=0.9,
                                 observation_id="0123456789abcdef")
    mine = score_event(trace_id=TRACE, name="quality", value=0.9, score_id="my-id")
    assert first["body"]["id"] == again["body"]["id"] != on_observation["body"]["id"]
    assert mine["body"]["id"] == "my-id"
    assert len({first["id"], again["id"], on_observation["id"], mine["id"]}) == 4


@pytest.mark.parametrize(("value", "data_type"), [
    (math.nan, None), (math.inf, None), ("", None), (2, "BOOLEAN"), ("yes", "BOOLEAN"),
    (1.0, "CATEGORICAL"), (1.0, "TEXT"), (None, None),
])
def test_values_langfuse_would_refuse_raise_at_the_call(value, data_type):
    """A value Langfuse's ScoreBody refuses raises ValueError at the call, never later."""
    with pytest.raises(ValueError):
        score_event(trace_id=TRACE, name="x", value=value, data_type=data_type)


# --------------------------------------------------------------------------- pure 207 rules


@pytest.mark.parametrize(("code", "expected"), [
    (201, Verdict.DONE), (200, Verdict.DONE), (400, Verdict.REJECT), (404, Verdict.REJECT),
    (422, Verdict.REJECT), (401, Verdict.PAUSE), (403, Verdict.PAUSE),
    (429, Verdict.BACK_OFF), (500, Verdict.BACK_OFF), (503, Verdict.BACK_OFF),
    (408, Verdict.BACK_OFF),
])
def test_event_verdict_by_status(code, expected):
    """One event's own status in a 207 maps to done / reject alone / pause / back off."""
    assert event_verdict(code) is expected


def test_event_results_read_a_207_body():
    """successes and errors of a 207 body map each event id to its status and reason."""
    body = json.dumps({"successes": [{"id": "a", "status": 201}],
                       "errors": [{"id": "b", "status": 400, "message": "Invalid request data",
                                   "error": "value: Expected number"}]})
    assert event_results(body) == {"a": (201, ""),
                                   "b": (400, "Invalid request data: value: Expected number")}
    assert event_results("<html>") is None and event_results("[]") is None


# --------------------------------------------------------------------------- the sender


def test_a_207_success_moves_the_cursor_and_sends_the_ingestion_batch(config):
    """All events accepted: one POST to /api/public/ingestion with Basic auth, cursor at the end."""
    events = write_scores(config, ["a", "b", "c"])
    script = Script(accept_all)
    sender, reader = sender_for(config, script, Clock())
    assert ship(sender, reader) is True
    [request] = script.requests
    assert str(request.url) == "http://langfuse.test/api/public/ingestion"
    token = base64.b64encode(b"pk-lf-test:sk-lf-test").decode()
    assert request.headers["Authorization"] == f"Basic {token}"
    assert request.headers["Content-Type"] == "application/json"
    assert "Content-Encoding" not in request.headers
    assert script.batches[0] == events
    assert unshipped(config) == 0 and sender.shipped == 3


def test_a_rejected_event_is_dead_lettered_alone_with_its_reason(config):
    """A 207 error 400 for one event: that record alone goes to dead-letter/, the rest are done."""
    write_scores(config, ["a", "bad", "c"])
    sender, reader = sender_for(config, Script(per_event({"bad": 400})), Clock())
    assert ship(sender, reader) is True
    [letter] = read_dead_letters(config.spool_dir)
    [record] = letter.records
    assert record.kind == KIND_SCORE and json.loads(record.payload)["body"]["name"] == "bad"
    assert "HTTP 400" in letter.reason and "bad value" in letter.reason
    assert unshipped(config) == 0


def test_a_retryable_event_is_kept_and_only_it_is_resent(config):
    """A 207 error 500 for one event: kept and backed off; the next send carries it alone."""
    write_scores(config, ["a", "later", "c"])
    clock = Clock()
    script = Script(per_event({"later": 500}), accept_all)
    sender, reader = sender_for(config, script, clock)
    assert ship(sender, reader) is False
    assert unshipped(config) == 2, "the cursor must stop before the kept event"
    assert not sender.ready() and ship(sender, reader) is False and len(script.requests) == 1
    clock.now = sender.backoff.not_before
    assert ship(sender, reader) is True
    assert [e["body"]["name"] for e in script.batches[1]] == ["later"]
    assert unshipped(config) == 0 and read_dead_letters(config.spool_dir) == []


def test_whole_request_statuses_split_pause_and_back_off(config):
    """413 splits until one event stands alone; 401 pauses; 503 backs off after Retry-After."""
    write_scores(config, ["a", "b"])
    clock = Clock()
    script = Script(status(413), accept_all, accept_all, status(401), status(503, **{
        "Retry-After": "7"}), accept_all)
    sender, reader = sender_for(config, script, clock)
    assert ship(sender, reader) is True
    assert [len(b) for b in script.batches] == [2, 1, 1]
    write_scores(config, ["d"])
    assert ship(sender, reader) is False and unshipped(config) == 1
    assert sender.backoff.not_before == clock.now + 30
    clock.now = sender.backoff.not_before
    assert ship(sender, reader) is False and sender.backoff.not_before == clock.now + 7
    clock.now += 7
    assert ship(sender, reader) is True and unshipped(config) == 0


def test_unmentioned_events_and_network_errors_are_kept(config):
    """A 207 that omits an event, or a refused connection, keeps the scores for a resend."""
    write_scores(config, ["a"])
    clock = Clock()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    script = Script(lambda r: httpx.Response(207, json={"successes": [], "errors": []}), refuse,
                    accept_all)
    sender, reader = sender_for(config, script, clock)
    assert ship(sender, reader) is False and unshipped(config) == 1
    clock.now = sender.backoff.not_before
    assert ship(sender, reader) is False and unshipped(config) == 1
    clock.now = sender.backoff.not_before
    assert ship(sender, reader) is True and unshipped(config) == 0


def test_the_shipper_sends_spans_and_scores_on_their_own_answers(config):
    """Spans and scores in one batch: spans delivered while scores back off, each cursor apart."""
    spans_writer = SegmentWriter(config.spool_dir)
    frames = _span_frames(2)
    spans_writer.append(frames)
    write_scores(config, ["a"])
    span_posts: list[httpx.Request] = []

    def otlp(request: httpx.Request) -> httpx.Response:
        span_posts.append(request)
        return httpx.Response(200, json={})

    clock = Clock()
    stats = ShipperStats()
    reader = SpoolReader(config.spool_dir, stats)
    script = Script(status(503), accept_all)
    sender = BatchSender(
        config, HttpTransport(config, transport=httpx.MockTransport(otlp)), reader, stats,
        clock=clock, uniform=lowest,
        score_transport=ingestion_transport(config, transport=httpx.MockTransport(script)))
    items, _ = reader.next_batch()
    assert sender.deliver(items) is False
    assert len(span_posts) == 1 and unshipped(config) == 1
    span_segment = next(p for p, _ in list_segments(config.spool_dir)
                        if p.name.startswith(f"seg-w{spans_writer.writer_id}"))
    assert read_cursor(span_segment) == len(frames)
    clock.now = sender.scores.backoff.not_before
    items, _ = reader.next_batch()
    assert sender.deliver(items) is True
    assert len(span_posts) == 1 and unshipped(config) == 0


def _span_frames(n: int) -> bytes:
    """``n`` span records as the exporter writes them."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tracing.spool._exporter import span_frame

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for i in range(n):
        provider.get_tracer("langfuse-sdk").start_span(f"s{i}").end()
    return b"".join(span_frame(span) for span in exporter.get_finished_spans())


# --------------------------------------------------------------------------- score_task


@pytest.fixture
def producer(config: Config, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Config]]:
    """score_task as in a process that is not a worker, its shipper start recorded, not run."""
    started: list[Config] = []
    monkeypatch.setattr(_runtime, "current", lambda: None)  # not a worker, whatever ran before
    monkeypatch.setattr(_instrument, "_config", None)
    monkeypatch.setattr(_producer, "_config", config)
    monkeypatch.setattr(_producer, "_shipper", None)
    monkeypatch.setattr(_producer, "_pid", 0)
    monkeypatch.setattr(_producer, "_writers", {})
    monkeypatch.setattr(_producer, "_start_shipper",
                        lambda c: (started.append(c), setattr(_producer, "_shipper", False)))
    yield started


def test_score_task_writes_durable_records_and_starts_one_shipper(config, producer):
    """score_task puts each score form on disk as a KIND_SCORE record and starts one shipper."""
    task, child = "task-1", "task-2"
    trace = tracing.score_task(task, "helpful", 1.0, comment="ok")
    tracing.score_task(task, "verdict", "good")
    tracing.score_task(task, "thumbs_up", False)
    tracing.score_task(task, "accuracy", 0.5, observation=True)
    tracing.score_task(child, "accuracy", 0.7, root_id=task, observation_id="00000000000000aa")
    assert trace == tracing.trace_id_for(task) == tracing.score_task(child, "x", 1, root_id=task)
    bodies = [json.loads(r.payload)["body"] for path, _ in list_segments(config.spool_dir)
              for r in scan_file(path).records if r.kind == KIND_SCORE]
    assert [(b["name"], b["value"], b["dataType"]) for b in bodies] == [
        ("helpful", 1.0, "NUMERIC"), ("verdict", "good", "CATEGORICAL"),
        ("thumbs_up", 0.0, "BOOLEAN"), ("accuracy", 0.5, "NUMERIC"),
        ("accuracy", 0.7, "NUMERIC"), ("x", 1.0, "NUMERIC")]
    assert {b["traceId"] for b in bodies} == {trace} and bodies[0]["comment"] == "ok"
    assert bodies[3]["observationId"] == tracing.root_observation_id_for(task)
    assert bodies[4]["observationId"] == "00000000000000aa"
    assert "observationId" not in bodies[0]
    assert producer == [config], "one shipper per process, started on the first score"
    with pytest.raises(ValueError, match="observation_id"):
        tracing.score_task(child, "accuracy", 0.7, root_id=task, observation=True)


def test_score_task_never_waits_for_a_hanging_langfuse(tmp_path, monkeypatch):
    """With Langfuse hanging (5 s per request), 5 score_task calls take well under 50 ms each
    and the producer's own shipper delivers every score once Langfuse answers."""
    with LangfuseReceiver(public_key="pk-lf-s", secret_key="sk-lf-s") as receiver:
        receiver.set_latency(5)
        config = load_config(environ={
            "LANGFUSE_PUBLIC_KEY": "pk-lf-s", "LANGFUSE_SECRET_KEY": "sk-lf-s",
            "LANGFUSE_BASE_URL": receiver.base_url, "LANGFUSE_TIMEOUT": "1",
            "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path / "spool")})
        monkeypatch.setattr(_runtime, "current", lambda: None)
        monkeypatch.setattr(_instrument, "_config", None)
        monkeypatch.setattr(_producer, "_config", config)
        monkeypatch.setattr(_producer, "_shipper", None)
        monkeypatch.setattr(_producer, "_pid", 0)
        monkeypatch.setattr(_producer, "_writers", {})
        try:
            durations = []
            for i in range(5):
                started = time.perf_counter()
                tracing.score_task(f"task-{i}", "helpful", 1.0)
                durations.append(time.perf_counter() - started)
            assert max(durations) < 0.05, durations
            receiver.set_latency(0)
            scores = receiver.wait_for_scores(5, timeout=30)
        finally:
            shipper = _producer._shipper
            if shipper:
                shipper.stop(1.0)
        assert sorted(s["traceId"] for s in scores) == sorted(
            tracing.trace_id_for(f"task-{i}") for i in range(5))
        assert len({s["id"] for s in receiver.scores}) == len(receiver.scores) >= 5


def test_transport_seam_keeps_its_defaults(config):
    """HttpTransport without the new keywords still posts gzip OTLP to the traces endpoint."""
    seen: list[httpx.Request] = []
    transport = HttpTransport(config, transport=httpx.MockTransport(
        lambda r: (seen.append(r), httpx.Response(200, text="x" * 600))[1]))
    result = transport.send(b"abc", 1.0)
    assert result == SendResult(200, body="x" * 500)
    assert str(seen[0].url).endswith("/api/public/otel/v1/traces")
    assert seen[0].headers["Content-Encoding"] == "gzip"


class FakeStore:
    """A hand-off stream in memory: entries taken once, acknowledged one by one."""

    key = "celery-langfuse:handoff:test"

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.acked: list[bytes] = []

    def take(self, count: int) -> list[Any]:
        taken, self.items = self.items[:count], self.items[count:]
        return taken

    def claim_deadline(self) -> float:
        return time.monotonic() + 60

    def commit(self, items: Any) -> None:
        self.acked += [item.entry_id for item in items]


def test_handed_off_scores_are_drained_through_the_score_route(config):
    """Score entries a stopping worker handed off go to /api/public/ingestion, each acked once."""
    from tracing.shipping._handoff import HandoffItem
    from tracing.shipping._handoff_drain import HandoffDrainer, HandoffReader

    events = [score_event(trace_id=TRACE, name=n, value=1.0) for n in ("a", "b")]
    items = [HandoffItem(f"1-{i}".encode(), encode_event(e), KIND_SCORE)
             for i, e in enumerate(events)]
    store = FakeStore(items)
    script = Script(accept_all)
    stats = ShipperStats()
    sender = BatchSender(
        config, HttpTransport(config, transport=httpx.MockTransport(
            lambda r: pytest.fail("no span was handed off"))),
        HandoffReader(store, config.spool_dir), stats,  # type: ignore[arg-type]
        score_transport=ingestion_transport(config, transport=httpx.MockTransport(script)))
    drainer = HandoffDrainer(store, sender.deliver, spool_dir=config.spool_dir,  # type: ignore[arg-type]
                             ready=sender.ready)
    assert drainer.drain_once() == 2
    assert script.batches == [events] and store.acked == [b"1-0", b"1-1"]


def test_in_a_worker_the_score_goes_to_the_worker_spool_and_wakes_its_shipper(
        config, producer, monkeypatch):
    """With a tracing runtime (a worker), a score lands in its spool and wakes its shipper; no
    shipper of its own starts."""
    from types import SimpleNamespace

    from tracing.instrumentation import _runtime

    woken: list[bool] = []
    runtime = SimpleNamespace(config=config, shipper=SimpleNamespace(
        wake=lambda: woken.append(True)))
    monkeypatch.setattr(_runtime, "current", lambda: runtime)
    monkeypatch.setattr(_producer, "_config", None)
    tracing.score_task("task-9", "helpful", 1.0)
    assert unshipped(config) == 1 and woken == [True] and producer == []

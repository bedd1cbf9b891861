"""The pure parts of run_experiment: items and ids, the attributes an item's observation gets
(checked against what the Langfuse SDK's own run_experiment writes), the message header, the
run-level score record, the receiver's mirror of the server's extraction, and the summary."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from langfuse import Langfuse
from langfuse.api import DatasetItem
from langfuse.experiment import Evaluation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracing import _sdk, root_observation_id_for
from tracing.experiments._experiment_items import (
    Run,
    item_attributes,
    items_of,
    local_experiment_id,
    task_id_for,
)
from tracing.experiments._experiment_results import TaskItemResult, TaskRunResult
from tracing.instrumentation._experiment_span import (
    EXPERIMENT_HEADER,
    encode_header,
    experiment_attributes,
)
from tracing.spool._score_record import score_event
from tracing.testing import experiment_fields, observations_from_otlp

DATA = [{"input": {"question": "q0"}, "expected_output": "Q0", "metadata": {"level": "easy"}},
        {"input": "plain text", "expected_output": {"answer": 1}}]
# The names the Langfuse server v4.16 extracts (packages/shared/src/server/otel/attributes.ts).
SERVER_NAMES = {
    "langfuse.experiment.id", "langfuse.experiment.name", "langfuse.experiment.metadata",
    "langfuse.experiment.description", "langfuse.experiment.dataset.id",
    "langfuse.experiment.item.id", "langfuse.experiment.item.version",
    "langfuse.experiment.item.metadata", "langfuse.experiment.item.root_observation_id",
    "langfuse.experiment.item.expected_output",
}


def dataset_item(i: int) -> DatasetItem:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    return DatasetItem(id=f"item-{i}", status="ACTIVE", input={"q": i}, expected_output=i,
                       metadata={"n": i}, dataset_id="ds-1", dataset_name="set",
                       created_at=now, updated_at=now, media_references=[])


def test_items_and_task_ids_are_derived_from_the_run_and_the_item():
    """Dicts are keyed by position, dataset items by their id; a task id depends only on
    the run name and that key, so a second call computes the same ids."""
    local = items_of(DATA).items
    assert local[0].payload == {"input": {"question": "q0"}, "expected_output": "Q0",
                                "metadata": {"level": "easy"}}
    remote = items_of(SimpleNamespace(items=[dataset_item(1)], version=None))
    assert remote.dataset_id == "ds-1" and remote.items[0].payload["id"] == "item-1"
    ids = [task_id_for("run-a", i) for i in local]
    assert ids == [task_id_for("run-a", i) for i in items_of(DATA).items]
    assert len(set(ids)) == 2 and task_id_for("run-b", local[0]) != ids[0]
    assert str(uuid.UUID(ids[0])) == ids[0]
    assert local_experiment_id("run-a", None) == local_experiment_id("run-a", None) != \
        local_experiment_id("run-b", None)


def test_an_item_that_is_neither_a_dict_nor_a_dataset_item_is_named():
    """A bad item raises TypeError naming its position; a non-list names the type."""
    with pytest.raises(TypeError, match="item 1 is a int"):
        items_of([{"input": 1}, 5])
    with pytest.raises(TypeError, match="got str"):
        items_of("not a list")


def test_an_items_attributes_are_the_ones_the_sdk_writes_on_its_task_span():
    """For the same local item, our observation gets the SDK's experiment-item-task span's
    langfuse.experiment.* names (all of them server names) and the same values, except the
    ids the SDK draws at random; environment sdk-experiment as the SDK's."""
    key = f"pk-lf-exp-{uuid.uuid4().hex[:8]}"
    exporter = InMemorySpanExporter()
    client = Langfuse(public_key=key, secret_key="sk", base_url="http://127.0.0.1:9",
                      tracer_provider=TracerProvider(), span_exporter=exporter)
    try:
        client.run_experiment(name="exp", run_name="run-1", description="about", data=DATA[:1],
                              metadata={"model": "m1"}, task=lambda *, item, **_: "out")
        client.flush()
    finally:
        _sdk.forget_client(key)
    [sdk_span] = [s for s in exporter.get_finished_spans()
                  if s.name == "experiment-item-task"]
    sdk = {k: v for k, v in (sdk_span.attributes or {}).items() if k.startswith("langfuse.exp")}
    run = Run("exp", "run-1", "0123456789abcdef", "about", {"model": "m1"}, None, None)
    item = items_of(DATA).items[0]
    ours, metadata = item_attributes(run, item, "task-1")
    ours_exp = {k: v for k, v in ours.items() if k.startswith("langfuse.exp")}
    assert set(ours_exp) == set(sdk) and set(ours_exp) <= SERVER_NAMES
    drawn = {"langfuse.experiment.id", "langfuse.experiment.item.root_observation_id"}
    assert {k: v for k, v in ours_exp.items() if k not in drawn} == \
        {k: v for k, v in sdk.items() if k not in drawn}
    assert ours["langfuse.experiment.item.root_observation_id"] == \
        root_observation_id_for("task-1")
    assert ours["langfuse.environment"] == sdk_span.attributes["langfuse.environment"]
    assert metadata == {"level": "easy", "model": "m1", "experiment_name": "exp",
                        "experiment_run_name": "run-1"}


def test_a_dataset_item_names_its_dataset_item_and_version():
    """A dataset item's attributes carry the dataset id, its item id and, for a dataset
    fetched at a version, that version as UTC text; its metadata names both ids."""
    version = datetime(2026, 11, 2, 10, 30, tzinfo=UTC)
    found = items_of(SimpleNamespace(items=[dataset_item(7)], version=version))
    run = Run("exp", "run-1", "e" * 16, None, None, found.dataset_id, found.dataset_version)
    attributes, metadata = item_attributes(run, found.items[0], "task-7")
    assert attributes["langfuse.experiment.dataset.id"] == "ds-1"
    assert attributes["langfuse.experiment.item.id"] == "item-7"
    assert attributes["langfuse.experiment.item.version"] == "2026-11-02T10:30:00Z"
    assert attributes["langfuse.experiment.item.expected_output"] == "7"
    assert metadata["dataset_item_id"] == "item-7" and metadata["dataset_id"] == "ds-1"


def test_the_worker_reads_the_header_at_either_level_and_only_experiment_names(caplog):
    """The header is read top-level or nested; only langfuse.experiment.* and the
    environment become attributes, metadata as the SDK writes it; a bad header is ignored
    with a warning naming it."""
    header = encode_header({"langfuse.experiment.id": "abc", "langfuse.environment":
                            "sdk-experiment", "langfuse.trace.name": "sneaky"}, {"k": [1]})
    top = SimpleNamespace(headers=None, **{EXPERIMENT_HEADER: header})
    nested = SimpleNamespace(headers={"headers": {EXPERIMENT_HEADER: header}})
    for request in (top, nested):
        assert experiment_attributes(request) == {
            "langfuse.experiment.id": "abc", "langfuse.environment": "sdk-experiment",
            "langfuse.observation.metadata.k": "[1]"}
    assert experiment_attributes(SimpleNamespace(headers={})) == {}
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        bad = SimpleNamespace(headers={EXPERIMENT_HEADER: "{not json"})
        assert experiment_attributes(bad) == {}
    assert EXPERIMENT_HEADER in caplog.text


def test_a_run_level_score_targets_the_dataset_run():
    """A run-level score has datasetRunId and no traceId, a stable id from the run and the
    name, and its score config; a score with no target at all is refused."""
    event = score_event(trace_id=None, dataset_run_id="exp-1", name="accuracy", value=0.5,
                        config_id="cfg")
    body = event["body"]
    assert body["datasetRunId"] == "exp-1" and "traceId" not in body
    assert body["configId"] == "cfg"
    again = score_event(trace_id=None, dataset_run_id="exp-1", name="accuracy", value=0.7)
    assert again["body"]["id"] == body["id"]
    with pytest.raises(ValueError, match="target"):
        score_event(trace_id=None, name="accuracy", value=1)


def _span_with(attributes: dict[str, Any]) -> Any:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "x"
    for key, value in attributes.items():
        span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    [observation] = observations_from_otlp(request, 0.0)
    return observation


def test_the_receiver_reads_experiment_fields_as_the_server_does():
    """Metadata is the JSON object in the attribute merged with prefixed keys, a version
    that is not a timestamp is dropped, and a span is an item root when its id is the
    item's root observation id."""
    observation = _span_with({
        "langfuse.experiment.id": "e1", "langfuse.experiment.item.id": "i1",
        "langfuse.experiment.metadata": json.dumps({"a": 1}),
        "langfuse.experiment.metadata.b": "2",
        "langfuse.experiment.item.metadata": "[1, 2]",
        "langfuse.experiment.item.version": "v1",
        "langfuse.experiment.item.root_observation_id": "02" * 8,
    })
    fields = experiment_fields(observation)
    assert fields is not None
    assert fields.metadata == {"a": 1, "b": "2"} and fields.item_metadata == {"0": 1, "1": 2}
    assert fields.item_version is None and fields.is_item_root(observation.id)
    assert experiment_fields(_span_with({"other": "x"})) is None


def test_the_summary_is_the_sdks_plus_the_failed_items():
    """format() is the SDK's summary (averages) followed by how many items failed and why."""
    ok = TaskItemResult(item={"input": 1}, output=1, trace_id="t", task_id="a", state="SUCCESS",
                        evaluations=[Evaluation(name="exact", value=1.0)])
    bad = TaskItemResult(item={"input": 2}, output=None, trace_id="u", task_id="b",
                         state="FAILURE", error="ValueError: no", evaluations=[])
    result = TaskRunResult(name="exp", run_name="run", description=None,
                           item_results=[ok, bad], run_evaluations=[], experiment_id="e")
    text = result.format()
    assert "exact: 1.000" in text and "1 of 2 items failed" in text
    assert "task b: ValueError: no" in text and result.failed == [bad]


def test_evaluators_may_be_async_and_a_failing_one_is_skipped():
    """An async evaluator's result is awaited (also from inside a running event loop); an
    evaluator that raises gives no evaluation and does not stop the others."""
    import asyncio

    from tracing.experiments._experiment_results import evaluate

    async def judged(**_: Any) -> dict[str, Any]:
        return {"name": "judged", "value": 0.5}

    def broken(**_: Any) -> Evaluation:
        raise RuntimeError("judge down")

    assert [e.name for e in evaluate(judged, output=1)] == ["judged"]
    assert evaluate(broken, output=1) == []

    async def inside_a_loop() -> list[Evaluation]:
        return evaluate(judged, output=1)

    assert [e.value for e in asyncio.run(inside_a_loop())] == [0.5]


def test_what_cannot_run_an_experiment_is_refused_up_front():
    """No result backend, rpc:// results, a task that ignores its result, a plain function or
    a bad max_concurrency: each is refused before anything is sent, saying what to change."""
    from celery import Celery

    import tracing

    def echo(item: Any) -> Any:
        return item

    no_backend = Celery("no-backend", broker="memory://")
    with pytest.raises(ValueError, match="result backend"):
        tracing.run_experiment(name="e", data=DATA, task=no_backend.task(echo, name="t.a"))
    rpc = Celery("rpc-backend", broker="memory://", backend="rpc://")
    with pytest.raises(ValueError, match="stores results"):
        tracing.run_experiment(name="e", data=DATA, task=rpc.task(echo, name="t.r"))
    app = Celery("with-backend", broker="memory://", backend="cache+memory://")
    quiet = app.task(echo, name="t.quiet", ignore_result=True)
    with pytest.raises(ValueError, match="ignore_result=False"):
        tracing.run_experiment(name="e", data=DATA, task=quiet)
    with pytest.raises(TypeError, match=r"Langfuse\.run_experiment"):
        tracing.run_experiment(name="e", data=DATA, task=lambda item: item)
    with pytest.raises(ValueError, match="max_concurrency"):
        tracing.run_experiment(name="e", data=DATA, task="t.a", app=app, max_concurrency=0)


class FakeBackend:
    """A result backend in memory: what the ledger reads and writes (no mget: one read each)."""

    def __init__(self) -> None:
        self.metas: dict[str, dict[str, Any]] = {}
        self.later: dict[str, dict[str, Any]] = {}  # stored on the first read: a task finishing

    def store_result(self, task_id: str, result: Any, state: str) -> None:
        self.metas[task_id] = {"status": state, "result": result}

    def get_task_meta(self, task_id: str, cache: bool = True) -> dict[str, Any]:
        meta = dict(self.metas.get(task_id) or {"status": "PENDING", "result": None})
        if task_id in self.later:
            self.metas[task_id] = self.later.pop(task_id)
        return meta


class FakeTask:
    """Records what is sent; a test settles a sent task by storing its result."""

    name = "t.fake"

    def __init__(self, backend: FakeBackend, succeed: bool = True) -> None:
        self.backend, self.succeed, self.sent = backend, succeed, []

    def apply_async(self, *, kwargs: Any, task_id: str, root_id: str, headers: Any) -> None:
        self.sent.append(task_id)
        if self.succeed:
            self.backend.store_result(task_id, {"echo": kwargs["item"]["input"]}, "SUCCESS")


def _runner(backend: FakeBackend, task: FakeTask, run_name: str = "r") -> Any:
    from tracing.experiments._experiment_ledger import Ledger
    from tracing.experiments._experiments import _Runner

    data = [{"input": i, "expected_output": {"echo": i}} for i in range(4)]
    run = Run("exp", run_name, "e" * 16, None, None, None, None)

    def match(*, output: Any, expected_output: Any, **_: Any) -> Evaluation:
        return Evaluation(name="match", value=float(output == expected_output))

    return _Runner(run, items_of(data).items, task, Ledger(backend, run_name, None), [match],
                   2, None)


def test_a_resumed_run_settles_reuses_waits_or_sends_each_item_by_its_marks(monkeypatch):
    """Scored items are reused, finished ones evaluated, published ones waited for, the rest
    sent: every item settled once, only the unsent item sent, each score written once."""
    from tracing.experiments import _experiment_results
    from tracing.experiments._experiment_ledger import Ledger

    scores: list[dict[str, Any]] = []
    monkeypatch.setattr(_experiment_results, "record_score", lambda **f: scores.append(f))
    backend = FakeBackend()
    first = _runner(backend, FakeTask(backend))
    ids = [first.task_ids[i] for i in range(4)]
    ledger = Ledger(backend, "r", None)
    backend.store_result(ids[0], {"echo": 0}, "SUCCESS")  # scored by the dead caller
    ledger.mark_scored(ids[0], [{"name": "match", "value": 1.0}])
    backend.store_result(ids[1], {"echo": 1}, "SUCCESS")  # finished, not scored
    ledger.mark_sent(ids[2])                               # published, still running
    backend.later[ids[2]] = {"status": "SUCCESS", "result": {"echo": 2}}  # finishes later
    task = FakeTask(backend)
    results = _runner(backend, task).run()
    assert task.sent == [ids[3]]
    assert [r.output for r in results] == [{"echo": i} for i in range(4)]
    assert [[e.value for e in r.evaluations] for r in results] == [[1.0]] * 4
    assert sorted(s["trace_id"] for s in scores) == sorted(r.trace_id for r in results[1:])


def test_a_run_with_nothing_settling_warns_once_naming_an_item(monkeypatch, caplog):
    """Items in flight that never settle (lost messages) make the run say so once, naming a
    task and resend_unfinished, while it keeps waiting."""
    from tracing.experiments import _experiments

    backend = FakeBackend()
    task = FakeTask(backend, succeed=False)
    runner = _runner(backend, task)
    monkeypatch.setattr(_experiments, "STALL_WARNING", 0.05)
    polls = []

    def results(tids: Any) -> dict[str, Any]:
        polls.append(1)
        if len(polls) < 12:
            return {}
        return {t: {"status": "FAILURE", "result": "lost"} for t in tids}

    monkeypatch.setattr(runner.ledger, "results", results)
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        outcome = runner.run()
    assert caplog.text.count("no item settled") == 1 and "resend_unfinished" in caplog.text
    assert all(r.state == "FAILURE" for r in outcome)

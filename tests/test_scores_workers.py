"""Durable scores with real workers: a producer process scores tasks while Langfuse is down and
exits; a real worker's shipper delivers every score exactly once when Langfuse is back, and
sets a score Langfuse rejects aside alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tracing
from tests.support import wait_until
from tests.test_lifecycle import run_generations
from tracing.spool import KIND_SCORE, SegmentWriter, encode_frame, read_dead_letters
from tracing.spool._score_record import encode_event, score_event

ROOT = Path(__file__).resolve().parent.parent

# A web process scoring: each call timed, each form once; it prints what it did and exits.
PRODUCER = """
import json, sys, time
import tracing
from tracing import score_task  # imports the scoring code; the calls below are timed alone

ids = sys.argv[1:]
calls = [
    lambda t: tracing.score_task(t, "helpful", 0.9, comment="user feedback"),
    lambda t: tracing.score_task(t, "verdict", "good"),
    lambda t: tracing.score_task(t, "thumbs_up", True),
    lambda t: tracing.score_task(t, "accuracy", 1, observation=True),
    lambda t: tracing.score_task(t, "correct", 0, data_type="BOOLEAN"),
]
durations = []
for task_id, call in zip(ids, calls):
    started = time.perf_counter()
    call(task_id)
    durations.append(time.perf_counter() - started)
print(json.dumps({"durations": durations}), flush=True)
"""


def run_producer(env: dict[str, str], task_ids: list[str]) -> tuple[list[float], str]:
    """Run the producer script in a process of its own; its call durations and its log."""
    out = subprocess.run([sys.executable, "-c", PRODUCER, *task_ids], env={**env, "PYTHONPATH":
                         str(ROOT)}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["durations"], out.stderr


@pytest.mark.slow
def test_scores_made_while_langfuse_is_down_arrive_once_shipped_by_a_worker(
    start_worker, worker_env, receiver, spool_dir
):
    """A producer scores 5 tasks while Langfuse is down: each call returns in well under a
    second; it exits; once Langfuse is up, the worker's shipper delivers all 5 exactly once."""
    worker = start_worker()
    task_ids = run_generations(worker_env, 5)
    receiver.down()
    durations, log = run_producer(worker_env, task_ids)
    # Each call is a local write; the first also starts the shipper thread.
    assert len(durations) == 5 and max(durations) < 1.0, durations
    assert "5 score(s) not delivered to Langfuse yet stay in" in log, log
    receiver.up()  # the producer is gone: only the worker can ship them now
    receiver.wait_for_scores(5, timeout=60)
    assert worker.stop() == 0
    scores = receiver.scores
    assert len(scores) == 5 and len({s["id"] for s in scores}) == 5, scores
    by_name = {s["name"]: s for s in scores}
    assert {n: (s["value"], s["dataType"]) for n, s in by_name.items()} == {
        "helpful": (0.9, "NUMERIC"), "verdict": ("good", "CATEGORICAL"),
        "thumbs_up": (1.0, "BOOLEAN"), "accuracy": (1.0, "NUMERIC"),
        "correct": (0.0, "BOOLEAN")}
    assert [by_name[n]["traceId"] for n in ("helpful", "verdict", "thumbs_up", "accuracy",
                                           "correct")] == [tracing.trace_id_for(t)
                                                           for t in task_ids]
    assert by_name["helpful"]["comment"] == "user feedback"
    assert by_name["accuracy"]["observationId"] == tracing.root_observation_id_for(task_ids[3])
    assert [o.name for o in receiver.observations
            if o.id == by_name["accuracy"]["observationId"]] == ["t.generate"]
    assert read_dead_letters(spool_dir) == []


@pytest.mark.slow
def test_a_rejected_score_is_dead_lettered_alone_by_the_worker(
    start_worker, worker_env, receiver, spool_dir
):
    """Langfuse refuses one score of three (207, error 400 for that event): the worker sets it
    aside alone, with the reason, and delivers the two others once."""
    start_worker()
    trace = tracing.trace_id_for("some-task")
    good = [score_event(trace_id=trace, name=n, value=1.0) for n in ("first", "last")]
    bad = score_event(trace_id=trace, name="broken", value=1.0)
    del bad["body"]["value"]  # what Langfuse's ScoreBody refuses
    SegmentWriter(spool_dir).append(b"".join(
        encode_frame(KIND_SCORE, encode_event(e)) for e in (good[0], bad, good[1])))
    receiver.wait_for_scores(2, timeout=60)
    wait_until(lambda: read_dead_letters(spool_dir), 30, "the rejected score in dead-letter/")
    [letter] = read_dead_letters(spool_dir)
    [record] = letter.records
    assert record.kind == KIND_SCORE and json.loads(record.payload)["id"] == bad["id"]
    assert "HTTP 400" in letter.reason and "value" in letter.reason, letter.reason
    assert sorted(s["name"] for s in receiver.scores) == ["first", "last"]


@pytest.mark.slow
def test_a_producer_no_worker_ships_for_hands_its_scores_to_redis_at_exit(
    worker_env, receiver, tmp_path
):
    """A producer with a spool of its own exits while Langfuse is down: its 5 scores go to the
    deployment's Redis stream, and the drainer every worker's shipper runs delivers them exactly
    once when Langfuse is back."""
    from tracing import load_config
    from tracing.instrumentation._scores import pending_scores
    from tracing.shipping._handoff_drain import drainer_for
    from tracing.shipping._status import ShipperStats
    from tracing.shipping._transport import HttpTransport

    receiver.down()
    web_spool = tmp_path / "web-spool"
    env = {**worker_env, "CELERY_LANGFUSE_SPOOL_DIR": str(web_spool),
           "CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "1"}
    task_ids = [f"web-task-{i}" for i in range(5)]
    durations, log = run_producer(env, task_ids)
    assert max(durations) < 0.2, durations
    assert "handed 5 unshipped" in log and "stay in" not in log, log
    assert pending_scores(web_spool) == 0
    receiver.up()
    config = load_config(environ={**env, "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path / "worker")})
    drainer = drainer_for(config, config.spool_dir, HttpTransport(config), ShipperStats(),
                          broker=env["CELERY_BROKER_URL"])
    assert drainer is not None
    try:
        wait_until(lambda: drainer.drain_once() and drainer.store.length() == 0, 30,
                   "the hand-off stream to drain")
    finally:
        drainer.store.close()
    scores = receiver.scores
    assert len(scores) == 5 and len({s["id"] for s in scores}) == 5, scores
    assert sorted(s["traceId"] for s in scores) == sorted(tracing.trace_id_for(t)
                                                          for t in task_ids)

"""The LLM jobs in a real prefork worker (`worker` app) on real Redis, traced end to end."""

# ruff: noqa: RUF001  (canvas names use the multiplication sign)
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

import tracing
from tasks.cli import enqueue, producer_app
from tests.fake_openai import FakeOpenAI, Reply, completion
from tests.support import ROOT
from tracing.testing import LangfuseReceiver, Observation

pytestmark = pytest.mark.slow


def in_trace(receiver: LangfuseReceiver, trace_id: str, n: int, what: str) -> list[Observation]:
    receiver.wait_for(lambda obs: len([o for o in obs if o.trace_id == trace_id]) >= n,
                      timeout=60, what=what)
    return [o for o in receiver.observations if o.trace_id == trace_id]


@pytest.fixture
def job_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, "TEST_QUEUE": "celery", "LLM_PROVIDER": "local",
            "LLM_LOCAL_LATENCY_MS": "1"}


@pytest.fixture
def producer(job_env):
    app = producer_app(job_env)
    yield app
    app.close()


TEXT = ("Celery runs tasks in worker processes. Langfuse records what the tasks did. "
        "A spool keeps every span on disk until Langfuse has it. Workers can die at any time.")


def test_summarize_generation_nests_under_its_task_with_usage_and_cost(
        start_worker, job_env, receiver, producer):
    """A summary's generation hangs under its task with model, usage and cost."""
    start_worker("worker", env=job_env)
    job = enqueue("summarize", app=producer, user_id="alice", text=TEXT)
    producer.AsyncResult(job.task_id).get(timeout=60)
    observations = in_trace(receiver, job.trace_id, 2, "the task and its generation")
    [task] = [o for o in observations if o.name == "tasks.summarize"]
    [generation] = [o for o in observations if o.type == "generation"]
    assert generation.parent_observation_id == task.id
    assert generation.model and generation.usage_details["input"] > 0
    assert generation.cost_details["total"] > 0
    assert task.user_id == "alice"


def test_research_agent_nests_tools_and_generations(start_worker, job_env, receiver, producer):
    """The agent is an `agent` observation with tool and generation steps under it."""
    start_worker("worker", env=job_env)
    job = enqueue("agent", app=producer, question="What is Celery and how many words?")
    producer.AsyncResult(job.task_id).get(timeout=60)
    observations = in_trace(receiver, job.trace_id, 4, "the agent's steps")
    [agent] = [o for o in observations if o.name == "tasks.research_agent"]
    assert agent.type == "agent"
    children = [o for o in observations if o.parent_observation_id == agent.id]
    assert {"tool", "generation"} <= {o.type for o in children}


@pytest.fixture
def traced_producer(job_env, monkeypatch) -> Iterator[None]:
    """This test process as a producer with the worker's keys and spool, as the `tasks`
    CLI is in the demo: it writes a canvas's root observation."""
    from tracing.instrumentation import _instrument, _producer

    monkeypatch.setattr(_instrument, "_config", tracing.load_config(environ=job_env))
    for name, value in (("_shipper", None), ("_pid", 0), ("_writers", {}), ("_config", None)):
        monkeypatch.setattr(_producer, name, value)
    yield
    if _producer._shipper:
        _producer._shipper.stop(1.0)


def test_chord_of_five_is_one_trace_with_correct_parents(
        start_worker, job_env, receiver, producer, traced_producer):
    """A chord of 5 summaries + combine sent as a user writes it lands in one trace: the
    summaries and the combine step siblings under the chord's root."""
    start_worker("worker", env=job_env)
    texts = [f"{TEXT} Document number {i} is here." for i in range(5)]
    job = enqueue("chord", app=producer, texts=texts)
    producer.AsyncResult(job.task_id).get(timeout=90)
    observations = in_trace(receiver, job.trace_id, 13,
                            "the root, 5 summaries, combine, generations")
    summaries = [o for o in observations if o.name == "tasks.summarize"]
    [combine] = [o for o in observations if o.name == "tasks.combine_summaries"]
    assert len(summaries) == 5
    [root] = [o for o in observations if o.parent_observation_id is None]
    assert root.name == "chord: tasks.summarize ×5 → tasks.combine_summaries"
    assert {o.parent_observation_id for o in [*summaries, combine]} == {root.id}
    for task in [*summaries, combine]:
        assert any(o.parent_observation_id == task.id and o.type == "generation"
                   for o in observations)


def test_rate_limited_provider_retries_in_one_trace(
        start_worker, job_env, receiver, producer, fake_openai: FakeOpenAI):
    """A provider answering 429 twice then 200 gives three attempts in one trace, the first
    two WARNING."""
    fake_openai.replies = [Reply(429, {"error": "slow down"}, {"Retry-After": "0.2"}),
                           Reply(429, {"error": "slow down"}, {"Retry-After": "0.2"}),
                           Reply(200, completion("A short summary."))]
    start_worker("worker", env={**job_env, "LLM_PROVIDER": "openai",
                                "LLM_BASE_URL": fake_openai.base_url, "LLM_API_KEY": "sk-x",
                                "LLM_MODEL": "gpt-4o-mini"})
    job = enqueue("summarize", app=producer, text=TEXT)
    producer.AsyncResult(job.task_id).get(timeout=60)
    observations = in_trace(receiver, job.trace_id, 6, "three attempts and their generations")
    attempts = sorted((o for o in observations if o.name == "tasks.summarize"),
                      key=lambda o: o.start_time)
    assert [a.level for a in attempts] == ["WARNING", "WARNING", "DEFAULT"]
    assert [a.metadata["attempt"] for a in attempts] == [1, 2, 3]
    assert "429" in (attempts[0].status_message or "")


def test_invalid_arguments_fail_once_with_a_clear_message(
        start_worker, job_env, receiver, producer):
    """Invalid job arguments: FAILURE naming the argument, and no retry storm."""
    start_worker("worker", env=job_env)
    result = producer.send_task("tasks.classify", kwargs={"text": TEXT, "labels": ["one"]})
    with pytest.raises(Exception, match="labels"):
        result.get(timeout=60)
    observations = in_trace(receiver, tracing.trace_id_for(result.id), 1, "the failed task")
    [task] = [o for o in observations if o.name == "tasks.classify"]
    assert task.level == "ERROR" and "labels" in (task.status_message or "")


def test_score_from_another_process_lands_on_the_trace(
        start_worker, job_env, receiver, producer):
    """A score sent by a separate process knowing only the task id lands on its trace."""
    start_worker("worker", env=job_env)
    job = enqueue("summarize", app=producer, text=TEXT)
    producer.AsyncResult(job.task_id).get(timeout=60)
    out = subprocess.run(
        [sys.executable, "-m", "tasks", "score", job.task_id, "helpful", "1", "--comment", "ok"],
        env={**job_env, "PATH": "/usr/bin:/bin"}, cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    [score] = receiver.wait_for_scores(1, timeout=30)
    assert score["traceId"] == job.trace_id and score["name"] == "helpful"

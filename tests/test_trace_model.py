"""The trace model, end to end: one real prefork worker, the real SDK, the loopback receiver.

One worker serves the whole module (starting one per test would dominate the run time);
each test sends its own tasks and waits for their observations by task id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider

import tracing
from tests.support import RedisServer, WorkerProcess, worker_environment
from tracing.testing import LangfuseReceiver, Observation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, module_receiver: LangfuseReceiver,
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return worker_environment(redis_server, module_receiver,
                              tmp_path_factory.mktemp("spool"), 15,
                              CELERY_LANGFUSE_MAX_PAYLOAD_BYTES="2048")


@pytest.fixture(scope="module")
def worker(env: dict[str, str]) -> Iterator[WorkerProcess]:
    process = WorkerProcess("tests.apps.traced_app", env, queue=env["TEST_QUEUE"])
    try:
        yield process.wait_ready()
    finally:
        process.kill_group()


@pytest.fixture(scope="module")
def app(env: dict[str, str], worker: WorkerProcess) -> Celery:
    producer = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
    producer.conf.task_default_queue = env["TEST_QUEUE"]
    # What instrument(app) does in a producer that imports the instrumented app module.
    from tracing.instrumentation._propagation import connect_publish_handler

    connect_publish_handler()
    return producer


def task_observations(receiver: LangfuseReceiver, task_id: str, n: int = 1,
                      timeout: float = 30) -> list[Observation]:
    """Wait for ``n`` observations of task ``task_id`` and return them by start time."""
    def mine(obs: list[Observation]) -> list[Observation]:
        return [o for o in obs if o.metadata.get("task_id") == task_id]

    receiver.wait_for(lambda obs: len(mine(obs)) >= n, timeout=timeout,
                      what=f"{n} observation(s) of task {task_id}")
    return sorted(mine(receiver.observations), key=lambda o: o.start_time or datetime.min)


def run(app: Celery, name: str, *args: Any, **kwargs: Any) -> str:
    """Send a task and return its id; its observation is what the tests wait for."""
    return str(app.send_task(name, args=args, kwargs=kwargs).id)


def test_success_has_input_output_and_celery_metadata(app, module_receiver):
    """A successful task is one span observation with its input, output and Celery facts."""
    task_id = run(app, "t.add", 2, 3)
    [obs] = task_observations(module_receiver, task_id)
    assert obs.name == "t.add" and obs.type == "span" and obs.level == "DEFAULT"
    assert obs.input == {"args": [2, 3], "kwargs": {}}
    assert obs.output == 5
    assert obs.trace_id == tracing.trace_id_for(task_id)
    for key in ("task_name", "attempt", "queue", "routing_key", "hostname", "pid", "root_id"):
        assert key in obs.metadata, key
    assert obs.metadata["final_state"] == "SUCCESS"


def test_failure_is_error_with_type_message_and_traceback(app, module_receiver):
    """A failing task's observation is ERROR with `ExcType: message` and the traceback."""
    task_id = run(app, "t.fail", "kaput")
    [obs] = task_observations(module_receiver, task_id)
    assert obs.level == "ERROR"
    assert obs.status_message == "ValueError: kaput"
    assert "Traceback" in obs.metadata["traceback"]
    assert obs.metadata["final_state"] == "FAILURE"


def test_expected_exception_in_throws_is_a_warning(app, module_receiver):
    """An exception listed in `task.throws` is a WARNING, not an ERROR."""
    [obs] = task_observations(module_receiver, run(app, "t.expected"))
    assert obs.level == "WARNING"
    assert obs.status_message == "KeyError: 'missing'"


def test_retry_is_one_observation_per_attempt_in_one_trace(app, module_receiver):
    """Each attempt of a retried task is its own observation in the same trace."""
    task_id = run(app, "t.retry")
    first, second = task_observations(module_receiver, task_id, n=2)
    assert first.trace_id == second.trace_id == tracing.trace_id_for(task_id)
    assert first.id != second.id
    assert first.level == "WARNING" and "retry" in (first.status_message or "")
    assert "flaky" in (first.status_message or "")
    assert (first.metadata["attempt"], second.metadata["attempt"]) == (1, 2)
    assert second.level == "DEFAULT" and second.output == "ok"


def test_ignored_task(app, module_receiver):
    """A task that raises Ignore ends as `ignored`."""
    [obs] = task_observations(module_receiver, run(app, "t.ignore"))
    assert obs.level == "DEFAULT" and obs.status_message == "ignored"
    assert obs.metadata["final_state"] == "IGNORED"


def test_rejected_task(app, module_receiver):
    """A task that raises Reject is a WARNING naming the reason."""
    [obs] = task_observations(module_receiver, run(app, "t.reject"))
    assert obs.level == "WARNING" and "rejected" in (obs.status_message or "")
    assert obs.metadata["final_state"] == "REJECTED"


def test_soft_time_limit_is_error(app, module_receiver):
    """A soft time limit is an ERROR naming SoftTimeLimitExceeded."""
    [obs] = task_observations(module_receiver, run(app, "t.soft"))
    assert obs.level == "ERROR" and "SoftTimeLimitExceeded" in (obs.status_message or "")


def test_unknown_task_is_recorded_by_the_main_process(app, module_receiver):
    """A message for a task the worker does not know becomes an ERROR observation."""
    result = app.send_task("t.does_not_exist", args=[1])
    [obs] = task_observations(module_receiver, result.id)
    assert obs.level == "ERROR" and "unknown task" in (obs.status_message or "")
    assert obs.name == "t.does_not_exist"


def test_expired_task_is_revoked(app, module_receiver):
    """A task that expired before it ran is a REVOKED WARNING."""
    expired = datetime.now(UTC) - timedelta(minutes=1)
    result = app.send_task("t.add", args=[1, 1], expires=expired)
    [obs] = task_observations(module_receiver, result.id)
    assert obs.level == "WARNING" and "expired" in (obs.status_message or "")
    assert obs.metadata["final_state"] == "REVOKED"
    assert obs.name == "t.add"  # the task's name, not celery.task


def test_revoked_before_it_ran_is_named_after_the_task(app, module_receiver):
    """A task revoked by id before a worker ran it is a REVOKED observation with its name."""
    task_id = str(uuid.uuid4())
    app.control.revoke(task_id)
    app.send_task("t.add", args=[2, 2], task_id=task_id, countdown=1)
    [obs] = task_observations(module_receiver, task_id)
    assert obs.name == "t.add" and obs.metadata["final_state"] == "REVOKED"


def test_revoked_name_comes_from_the_sender_or_the_request():
    """A revoked task's name is the sender's, else Celery 5's Context.task, else a request
    object's task name; never the placeholder while any of them names the task."""
    from celery.app.task import Context

    from tracing.instrumentation._task_elsewhere import revoked_task_name

    context = Context({"id": "x", "task": "t.add"})
    assert revoked_task_name(None, context) == "t.add"
    assert revoked_task_name(app_task("t.mul"), context) == "t.mul"
    request = type("Request", (), {"task": app_task("t.sub"), "name": "t.sub"})()
    assert revoked_task_name(None, request) == "t.sub"
    assert revoked_task_name(None, Context({"id": "x"})) == "celery.unknown"


def app_task(name: str) -> Any:
    return type("Task", (), {"name": name})()


OURS = {"traceparent", "tracestate", "celery_langfuse", "celery_langfuse_sent_at"}


def test_task_sees_the_headers_it_was_sent_on_every_attempt(app):
    """A task sent with custom headers sees exactly them (beside tracing's own top-level
    keys, never a nested "headers" dict) on its first attempt and after Task.retry()
    (Celery's test_task_retried_headers)."""
    result = app.send_task("t.headers", headers={"x-test-header": "test-value"})
    seen = result.get(timeout=30)
    for attempt in ("first", "second"):
        headers = seen[attempt]
        assert {k: v for k, v in headers.items() if k not in OURS} == {
            "x-test-header": "test-value"}, (attempt, headers)
        assert "celery_langfuse_sent_at" in headers
    assert "traceparent" in seen["second"]  # published by attempt 1, inside its observation


def test_resent_task_id_is_a_new_observation_under_the_first(app, module_receiver):
    """A task id sent a second time (after the first ran) is a second observation, marked as
    a redelivery, under the first, which stays the trace's one root."""
    task_id = str(uuid.uuid4())
    assert app.send_task("t.add", args=[1, 2], task_id=task_id).get(timeout=30) == 3
    task_observations(module_receiver, task_id)
    assert app.send_task("t.add", args=[1, 2], task_id=task_id).get(timeout=30) == 3
    first, again = task_observations(module_receiver, task_id, n=2)
    assert first.id == tracing.root_observation_id_for(task_id) != again.id
    assert again.parent_observation_id == first.id and not again.is_app_root
    assert again.metadata.get("redelivered") is True and again.metadata.get("execution") == 2
    trace = module_receiver.trace(tracing.trace_id_for(task_id))
    assert [r.id for r in trace.roots] == [first.id]


def test_chain_of_three_is_one_trace_with_parents(app, module_receiver):
    """A chain of three tasks lands in one trace, each step the child of the one before."""
    workflow = chain(
        app.signature("t.chain_step", args=["start", 1]),
        app.signature("t.chain_step", args=[2]),
        app.signature("t.chain_step", args=[3]),
    )
    result = workflow.apply_async()
    result.get(timeout=30)
    root_id = result.parent.parent.id
    observations = module_receiver.wait_for(
        lambda obs: len([o for o in obs if o.trace_id == tracing.trace_id_for(root_id)
                         and o.name == "t.chain_step"]) >= 3,
        timeout=30, what="three chain steps in one trace")
    steps = sorted((o for o in observations if o.trace_id == tracing.trace_id_for(root_id)
                    and o.name == "t.chain_step"), key=lambda o: o.start_time)
    assert steps[1].parent_observation_id == steps[0].id
    assert steps[2].parent_observation_id == steps[1].id
    generations = [o for o in observations if o.name.startswith("step-")]
    assert {g.parent_observation_id for g in generations} == {s.id for s in steps}


def test_task_sent_inside_an_observation_is_its_child(app, module_receiver):
    """A producer inside a Langfuse observation gets the task as that observation's child."""
    key = module_receiver.public_key
    client = Langfuse(public_key=key, secret_key=module_receiver.secret_key,
                      base_url=module_receiver.base_url, tracer_provider=TracerProvider())
    with (
        client.start_as_current_observation(name="web-request") as parent,
        tracing.trace_attributes(user_id="u-42", session_id="s-7", tags=["beta"]),
    ):
        result = app.send_task("t.add", args=[1, 2])
    client.flush()
    result.get(timeout=30)
    [obs] = task_observations(module_receiver, result.id)
    assert obs.trace_id == parent.trace_id
    assert obs.parent_observation_id == parent.id
    assert obs.user_id == "u-42" and obs.session_id == "s-7" and "beta" in obs.tags


def test_observe_inside_a_task_nests_under_it(app, module_receiver):
    """An @observe function called by a task is the task observation's child."""
    task_id = run(app, "t.observed", 21)
    [task] = task_observations(module_receiver, task_id)
    def steps(obs: list[Observation]) -> list[Observation]:
        return [o for o in obs if o.name == "helper-step" and o.trace_id == task.trace_id]

    [step] = steps(module_receiver.wait_for(steps, timeout=30, what="the @observe span"))
    assert step.parent_observation_id == task.id


def test_secrets_are_redacted_and_payloads_capped(app, module_receiver):
    """Values under secret-looking keys are redacted; over-long payloads are capped."""
    task_id = run(app, "t.secret", api_key="sk-very-secret", payload="x" * 10_000)
    [obs] = task_observations(module_receiver, task_id)
    assert "sk-very-secret" not in str(obs.input) + str(obs.output)
    assert obs.input["truncated"] is True and obs.input["original_bytes"] > 10_000
    assert obs.output["truncated"] is True


def test_tracing_failure_never_breaks_a_task(env, module_receiver):
    """With failures injected into the tracing layer, tasks still succeed (and it is logged),
    and each still gets its observation."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    process = WorkerProcess("tests.apps.traced_app",
                            {**env, "TEST_BREAK_TRACING": "1", "TEST_QUEUE": queue},
                            queue=queue, concurrency=1)
    try:
        process.wait_ready()
        producer = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
        assert producer.send_task("t.add", args=[20, 22], queue=queue).get(timeout=30) == 42
        failing = producer.send_task("t.fail", queue=queue)
        with pytest.raises(ValueError, match="boom"):
            failing.get(timeout=30)
        process.wait_for_line("rendering the task's input failed; the task is unaffected")
        [obs] = task_observations(module_receiver, failing.id)
        assert obs.level == "ERROR" and obs.input == "<input could not be rendered>"
        assert process.stop() == 0
    finally:
        process.kill_group()


def test_client_created_before_instrument_still_goes_through_the_spool(
    env, module_receiver, tmp_path: Path
):
    """A Langfuse client made at import time, before instrument(), still spools its spans."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    process = WorkerProcess("tests.apps.traced_app",
                            {**env, "TEST_CLIENT_BEFORE_INSTRUMENT": "1", "TEST_QUEUE": queue,
                             "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path / "spool")},
                            queue=queue, concurrency=1)
    try:
        process.wait_ready()
        producer = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
        result = producer.send_task("t.generate", args=[1], queue=queue)
        result.get(timeout=30)
        [obs] = task_observations(module_receiver, result.id)
        requests = [r for r in module_receiver.requests if obs.id in r.span_ids]
        assert requests and all(r.headers.get("user-agent") == "celery-langfuse"
                                for r in requests)
        assert process.stop() == 0
    finally:
        process.kill_group()


def test_internal_error_is_recorded(app, env, module_receiver):
    """A message Celery cannot run (kwargs not a mapping) is an ERROR `internal error`."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "t.add", "id": task_id, "root_id": task_id,
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "[]",
               "origin": "test", "ignore_result": False}
    body = [[], ["not", "a", "mapping"], {"callbacks": None, "errbacks": None,
                                          "chain": None, "chord": None}]
    with app.connection_for_write() as connection:
        connection.Producer().publish(
            body, routing_key=env["TEST_QUEUE"], headers=headers, serializer="json")
    [obs] = task_observations(module_receiver, task_id)
    assert obs.level == "ERROR" and "internal error" in (obs.status_message or "")


def test_langfuse_openai_generation_goes_through_the_spool(app, module_receiver, fake_openai):
    """A `langfuse.openai` call inside a task is a generation under it, shipped by the spool."""
    pytest.importorskip("openai")
    task_id = run(app, "t.openai", fake_openai.base_url)
    [task] = task_observations(module_receiver, task_id)

    def generations(obs: list[Observation]) -> list[Observation]:
        return [o for o in obs if o.type == "generation" and o.trace_id == task.trace_id]

    [generation] = generations(module_receiver.wait_for(
        generations, timeout=30, what="the OpenAI generation"))
    assert generation.parent_observation_id == task.id
    # Sent with OpenAI's names; stored by Langfuse as input/output/total.
    assert generation.usage_details == {"input": 11, "output": 3, "total": 14}
    requests = [r for r in module_receiver.requests if generation.id in r.span_ids]
    assert requests and all(r.headers.get("user-agent") == "celery-langfuse" for r in requests)


# -- the trace as Langfuse v4 shows it (see tracing/instrumentation/_task_span.py) ------

def test_single_task_is_the_parentless_root_of_its_trace(app, module_receiver):
    """A task sent from outside any trace is its trace's one root, with no parent span id at
    all, the derived ids, and its name, input and output on the trace."""
    task_id = run(app, "t.add", 2, 3)
    [obs] = task_observations(module_receiver, task_id)
    assert obs.parent_observation_id is None
    assert obs.id == tracing.root_observation_id_for(task_id)
    trace = module_receiver.trace(tracing.trace_id_for(task_id))
    assert [r.id for r in trace.roots] == [obs.id]
    assert (trace.name, trace.output) == ("t.add", obs.output)
    assert trace.input == obs.input and "2" in str(trace.input)


def test_chain_trace_is_named_after_its_first_task_with_its_input(app, module_receiver):
    """A chain's trace has one root (the first link): its name and input are the trace's,
    and no later link is an app root."""
    workflow = chain(app.signature("t.chain_step", args=["first-input", 1]),
                     app.signature("t.chain_step", args=[2]),
                     app.signature("t.chain_step", args=[3]))
    result = workflow.apply_async()
    result.get(timeout=30)
    root_id = result.parent.parent.id
    trace_id = tracing.trace_id_for(root_id)
    module_receiver.wait_for(
        lambda obs: len([o for o in obs if o.trace_id == trace_id
                         and o.name == "t.chain_step"]) >= 3,
        timeout=30, what="three chain steps")
    trace = module_receiver.trace(trace_id)
    assert [r.metadata.get("task_id") for r in trace.roots] == [root_id]
    assert trace.name == "t.chain_step"
    assert "first-input" in str(trace.input)
    assert not any(o.is_app_root for o in trace.observations if o.id != trace.roots[0].id)


def test_retry_attempt_hangs_under_the_attempt_before(app, module_receiver):
    """Attempt 2 of a retried root task is a child of attempt 1, never a second root."""
    task_id = run(app, "t.retry")
    first, second = task_observations(module_receiver, task_id, n=2)
    assert first.parent_observation_id is None
    assert second.parent_observation_id == first.id and not second.is_app_root
    trace = module_receiver.trace(tracing.trace_id_for(task_id))
    assert [r.id for r in trace.roots] == [first.id]


def test_producer_trace_keeps_the_producers_name(app, module_receiver):
    """A task sent inside a producer's observation is its child, not an app root, so the
    trace keeps the producer's name and input."""
    client = Langfuse(public_key=module_receiver.public_key,
                      secret_key=module_receiver.secret_key,
                      base_url=module_receiver.base_url, tracer_provider=TracerProvider())
    with client.start_as_current_observation(name="web-request", input="q") as parent:
        result = app.send_task("t.add", args=[4, 4])
    client.flush()
    result.get(timeout=30)
    [obs] = task_observations(module_receiver, result.id)
    assert obs.parent_observation_id == parent.id and not obs.is_app_root
    module_receiver.wait_for(lambda o: any(x.id == parent.id for x in o), timeout=30,
                             what="the producer's observation")
    trace = module_receiver.trace(parent.trace_id)
    assert (trace.name, trace.input) == ("web-request", "q")
    assert [r.id for r in trace.roots] == [parent.id]


# -- hostile payloads and a failing result store: one observation each, generation nested -------

def _generation_under(receiver: LangfuseReceiver, task: Observation) -> Observation:
    def mine(obs: list[Observation]) -> list[Observation]:
        return [o for o in obs if o.type == "generation" and o.trace_id == task.trace_id]

    [generation] = mine(receiver.wait_for(mine, timeout=30, what="the task's generation"))
    assert generation.parent_observation_id == task.id
    return generation


def test_lone_surrogate_in_kwargs_and_result(app, module_receiver):
    """A lone surrogate in kwargs (valid JSON on the wire) and in the result: the task
    succeeds with one observation, its input and output valid text, its generation under it."""
    result = app.send_task("t.echo", kwargs={"value": "x\udc80y"})
    assert result.get(timeout=30) == "x\udc80y"
    [task] = task_observations(module_receiver, result.id)
    assert task.level == "DEFAULT" and "x\ufffdy" in str(task.input)
    assert task.output == "x\ufffdy"
    _generation_under(module_receiver, task)


@pytest.mark.parametrize("kind", ["surrogate", "bad_repr_set", "recursive"])
def test_hostile_results_end_their_observation(app, module_receiver, kind):
    """A task returning a value that is hard to render still has its observation ended as
    SUCCESS at once (not reported later as a lost worker)."""
    task_id = run(app, "t.hostile_result", kind)
    [task] = task_observations(module_receiver, task_id)
    assert task.level == "DEFAULT" and task.metadata["final_state"] == "SUCCESS"
    assert isinstance(task.output, (str, list, dict))
    _generation_under(module_receiver, task)


def test_result_store_failure_is_one_observation(app, module_receiver):
    """When storing the result fails after the body succeeded, the attempt stays one
    observation (SUCCESS, with its generation) and the store failure is an ERROR event
    under it, never a second task observation."""
    task_id = run(app, "t.store_fails")
    [task] = task_observations(module_receiver, task_id)

    def events(obs: list[Observation]) -> list[Observation]:
        return [o for o in obs if o.parent_observation_id == task.id and o.type == "event"]

    [event] = events(module_receiver.wait_for(events, timeout=30, what="the store event"))
    assert event.level == "ERROR" and "ConnectionError" in (event.status_message or "")
    assert not event.is_app_root
    _generation_under(module_receiver, task)
    assert task.metadata["final_state"] == "SUCCESS"
    assert len([o for o in module_receiver.observations
                if o.metadata.get("task_id") == task_id]) == 1


# -- beyond spans: queue wait, joins, versions, prompts, trace URLs (issue 13) -------------------

def test_queue_wait_is_recorded_and_the_observation_starts_with_the_body(app, module_receiver):
    """A message that waited behind busy workers records how long (queue_wait_ms), and its
    observation starts when the body starts, not when the message was sent."""
    busy = [app.send_task("t.sleep", args=[0.6]) for _ in range(2)]
    sent = datetime.now(UTC)
    waiting = app.send_task("t.add", args=[1, 1])
    waiting.get(timeout=30)
    for result in busy:
        result.get(timeout=30)
    [obs] = task_observations(module_receiver, waiting.id)
    assert obs.metadata["queue_wait_ms"] >= 300
    assert obs.start_time >= sent + timedelta(milliseconds=300)


def test_link_join_starts_a_trace_of_its_own_with_the_senders_ids(app, module_receiver):
    """With join="link" a task sent inside a producer's observation starts its own trace and
    names the producer's trace and observation in its metadata; "off" ignores the sender."""
    client = Langfuse(public_key=module_receiver.public_key,
                      secret_key=module_receiver.secret_key,
                      base_url=module_receiver.base_url, tracer_provider=TracerProvider())
    with client.start_as_current_observation(name="fan-out") as parent:
        with tracing.trace_attributes(join="link"):
            linked = app.send_task("t.add", args=[1, 2])
        with tracing.trace_attributes(join="off"):
            unlinked = app.send_task("t.add", args=[2, 2])
    client.flush()
    [obs] = task_observations(module_receiver, linked.id)
    assert obs.trace_id == tracing.trace_id_for(linked.id) != parent.trace_id
    assert obs.parent_observation_id is None
    assert obs.metadata["linked_trace_id"] == parent.trace_id
    assert obs.metadata["linked_observation_id"] == parent.id
    [off] = task_observations(module_receiver, unlinked.id)
    assert off.trace_id == tracing.trace_id_for(unlinked.id)
    assert "linked_trace_id" not in off.metadata


def test_task_options_set_version_environment_and_join(app, module_receiver):
    """task_options(version=, environment=, join="link") shape the task's own observation."""
    client = Langfuse(public_key=module_receiver.public_key,
                      secret_key=module_receiver.secret_key,
                      base_url=module_receiver.base_url, tracer_provider=TracerProvider())
    with client.start_as_current_observation(name="sender") as parent:
        result = app.send_task("t.versioned")
    client.flush()
    [obs] = task_observations(module_receiver, result.id)
    assert (obs.version, obs.environment) == ("v7", "staging")
    assert obs.metadata["linked_observation_id"] == parent.id and obs.parent_observation_id is None


def test_prompt_linked_generation_arrives_linked_through_the_spool(app, module_receiver):
    """A generation made with a Langfuse prompt client keeps the prompt's name and version."""
    task_id = run(app, "t.prompted", "queues")
    [task] = task_observations(module_receiver, task_id)
    generation = _generation_under(module_receiver, task)
    assert generation.attributes["langfuse.observation.prompt.name"] == "summarize-topic"
    assert generation.attributes["langfuse.observation.prompt.version"] == 3


def test_trace_url_for_a_task(module_receiver):
    """trace_url_for gives the trace's UI address, with the project id looked up once."""
    from tracing.instrumentation import _urls

    config = tracing.load_config(public_key=module_receiver.public_key,
                                 secret_key=module_receiver.secret_key,
                                 base_url=module_receiver.base_url)
    _urls._projects.clear()
    assert _urls.trace_url_for("t-1", config=config, timeout=0) is None  # not known yet
    url = tracing.trace_url_for("t-1", config=config)
    assert url == (f"{module_receiver.base_url}/project/demo-project/traces/"
                   f"{tracing.trace_id_for('t-1')}")
    requests = len(module_receiver.requests)
    assert tracing.trace_url_for("t-2", root_id="t-1", config=config, timeout=0) == url
    assert len(module_receiver.requests) == requests, "the project id is cached"


def test_publish_observation_shows_where_the_job_left(app, module_receiver):
    """With publish observations on, a producer inside an observation records an
    `enqueue <task>` child (task id, routing key) and the task hangs under it."""
    from tracing.instrumentation import _propagation

    client = Langfuse(public_key=module_receiver.public_key,
                      secret_key=module_receiver.secret_key,
                      base_url=module_receiver.base_url, tracer_provider=TracerProvider())
    _propagation.record_publishes(True, module_receiver.public_key)
    try:
        with client.start_as_current_observation(name="web-request") as parent:
            result = app.send_task("t.add", args=[3, 3])
    finally:
        _propagation.record_publishes(False)
    client.flush()
    result.get(timeout=30)
    [task] = [o for o in task_observations(module_receiver, result.id, n=2)
              if o.name == "t.add"]
    enqueue = module_receiver.wait_for(
        lambda obs: [o for o in obs if o.name == "enqueue t.add"
                     and o.metadata.get("task_id") == result.id],
        timeout=30, what="the enqueue observation")
    [enqueue_obs] = [o for o in enqueue if o.name == "enqueue t.add"
                     and o.metadata.get("task_id") == result.id]
    assert enqueue_obs.parent_observation_id == parent.id
    assert task.parent_observation_id == enqueue_obs.id
    assert enqueue_obs.metadata.get("routing_key")

"""A message that runs again is a new attempt: its own observation, marked as a redelivery,
in the task's trace, under the first execution (the trace's one root), the dead run ERROR with
its own generation under it.

The rules are unit-tested with scripted inputs; the cases are real prefork workers on a
private redis-server with the loopback receiver (Langfuse v4's root rules).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from opentelemetry import trace as otel_trace

import tracing
from tests.support import WorkerProcess, spooled_span_count, wait_until
from tracing.instrumentation import _redelivery
from tracing.instrumentation._task_span import placement, root_observation_id_for
from tracing.spool import SegmentWriter
from tracing.spool._attempts import AttemptCloser, AttemptIndex, OpenAttempt
from tracing.testing import LangfuseReceiver, Observation


def attempt(task_id: str, span_id: str, start_ns: int, retries: int = 0) -> OpenAttempt:
    return OpenAttempt(task_id=task_id, name="t.x", trace_id="ab" * 16, span_id=span_id,
                       parent_span_id=None, start_ns=start_ns,
                       attributes={"langfuse.observation.metadata.retries": str(retries)})


# -- the rules -------------------------------------------------------------------------------

def test_a_later_execution_of_the_root_task_hangs_under_the_first():
    """The root task's first execution pins the derived root ids; a later execution of the
    same message is a child of that root with an id of its own."""
    _, pinned = placement({}, "root-task", "root-task", 0, execution=1)
    assert pinned is not None and f"{pinned[1]:016x}" == root_observation_id_for("root-task")
    context, pinned = placement({}, "root-task", "root-task", 0, execution=2)
    assert pinned is None
    parent = otel_trace.get_current_span(context).get_span_context()
    assert f"{parent.span_id:016x}" == root_observation_id_for("root-task")
    assert f"{parent.trace_id:032x}" == tracing.trace_id_for("root-task")


def test_execution_number_from_the_main_process_and_from_this_process():
    """An execution is the n-th by what the main process passed in delivery_info or by what
    this process ran itself (an eager re-apply); the broker's flag alone marks a redelivery
    without making it a later execution."""
    task_id = f"t-{uuid.uuid4().hex}"

    def request(**delivery: object) -> object:
        return types.SimpleNamespace(delivery_info=delivery, retries=0)

    assert _redelivery.execution_of(task_id, request()) == (1, False)
    assert _redelivery.execution_of(task_id, request()) == (2, True)  # the same process again
    other = f"t-{uuid.uuid4().hex}"
    assert _redelivery.execution_of(other, request(redelivered=True)) == (1, True)
    told = {_redelivery.EXECUTION_KEY: 3, "redelivered": True}
    assert _redelivery.execution_of(f"t-{uuid.uuid4().hex}", request(**told)) == (3, True)


def test_index_counts_executions_per_message(tmp_path: Path):
    """The spool's open-attempt records count the executions of (task id, retries)."""
    writer = SegmentWriter(tmp_path)
    for record in (attempt("t1", "01" * 8, 1), attempt("t1", "02" * 8, 2),
                   attempt("t1", "03" * 8, 3, retries=1)):
        writer.append(record.frame())
    index = AttemptIndex(tmp_path)
    assert (index.executions("t1"), index.executions("t1", 1), index.executions("t2")) == (2, 1, 0)


def test_main_process_closes_the_newest_execution_once(tmp_path: Path):
    """With two open executions of one task, close() closes the newest; the second signal
    Celery sends for a hard time limit closes nothing more; the older one is left to the
    orphan rule."""
    writer = SegmentWriter(tmp_path)
    older, newer = attempt("t1", "01" * 8, 10), attempt("t1", "02" * 8, 20)
    writer.append(older.frame())
    writer.append(newer.frame())
    written: list[bytes] = []
    closer = AttemptCloser(AttemptIndex(tmp_path), written.append)
    assert closer.close("t1", "hard time limit")
    assert closer.close("t1", "hard time limit")
    assert len(written) == 1 and bytes.fromhex("02" * 8) in written[0]
    assert [a.span_id for a in closer.index.open_attempts()] == [older.span_id]


# -- real workers ----------------------------------------------------------------------------

def producer(env: dict[str, str]) -> Celery:
    app = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
    app.conf.task_default_queue = env["TEST_QUEUE"]
    return app


def pool_children(worker: WorkerProcess) -> list[int]:
    """The worker's pool children (its other child is the shipping process)."""
    return [pid for pid in worker.child_pids()
            if b"_shipper_main" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def executions(receiver: LangfuseReceiver, task_id: str, n: int, name: str,
               generations: tuple[str, ...], timeout: float = 60) -> list[Observation]:
    """Wait for ``n`` observations of ``task_id`` and the named generations; the task's
    observations by start time."""
    def ready(obs: list[Observation]) -> bool:
        mine = [o for o in obs if o.name == name and o.metadata.get("task_id") == task_id]
        return len(mine) >= n and all(any(o.name == g for o in obs) for g in generations)

    receiver.wait_for(ready, timeout=timeout,
                      what=f"{n} observations of {task_id} and generations {generations}")
    mine = [o for o in receiver.observations
            if o.name == name and o.metadata.get("task_id") == task_id]
    return sorted(mine, key=lambda o: o.start_time or 0)


def assert_one_root_tree(receiver: LangfuseReceiver, task_id: str, first: Observation,
                         later: Observation) -> None:
    """The first execution is the trace's only root, under the derived ids; the later one
    is its child with an id of its own, marked as a redelivery."""
    assert first.id == root_observation_id_for(task_id) and first.parent_observation_id is None
    assert later.id != first.id and later.parent_observation_id == first.id
    assert later.trace_id == first.trace_id == tracing.trace_id_for(task_id)
    assert later.metadata.get("redelivered") is True and later.metadata.get("execution") == 2
    assert not later.is_app_root
    trace = receiver.trace(tracing.trace_id_for(task_id))
    assert [r.id for r in trace.roots] == [first.id]
    assert receiver.duplicates() == {}


@pytest.mark.slow
def test_pool_child_killed_then_redelivered(start_worker, worker_env, receiver, spool_dir):
    """acks_late + reject_on_worker_lost, the pool child SIGKILLed mid-task: the killed run
    is an ERROR observation holding its generation, the redelivered run a new observation
    under it holding its own."""
    worker = start_worker(concurrency=1)
    result = producer(worker_env).send_task("t.redelivered")
    wait_until(lambda: spooled_span_count(spool_dir) >= 1, 30, "the killed run's generation")
    [child] = pool_children(worker)
    os.kill(child, signal.SIGKILL)
    assert result.get(timeout=60) == "redelivered run"
    killed, again = executions(receiver, result.id, 2, "t.redelivered",
                               ("killed-run-llm", "redelivered-run-llm"))
    assert killed.level == "ERROR" and "worker lost" in (killed.status_message or "")
    assert again.level == "DEFAULT" and again.output is not None
    assert_one_root_tree(receiver, result.id, killed, again)
    by_name = {o.name: o for o in receiver.observations}
    assert by_name["killed-run-llm"].parent_observation_id == killed.id
    assert by_name["redelivered-run-llm"].parent_observation_id == again.id


@pytest.mark.slow
def test_whole_worker_killed_then_redelivered_to_the_next(
    start_worker, worker_env, receiver, spool_dir
):
    """The whole worker SIGKILLed mid-task (acks_late): the next worker on the same spool
    gets the message back from Redis; the killed run is closed ERROR, the redelivery is a new
    observation under it. A message the killed worker had prefetched but never started comes
    back flagged too, and is its trace's root (no earlier execution to hang under)."""
    env = {"TEST_VISIBILITY_TIMEOUT": "1"}
    worker = start_worker(env=env, concurrency=1, extra=("--prefetch-multiplier=2",))
    app = producer(worker_env)
    result = app.send_task("t.redelivered")
    wait_until(lambda: spooled_span_count(spool_dir) >= 1, 30, "the killed run's generation")
    prefetched = app.send_task("t.add", args=[20, 22])
    broker = redis.Redis.from_url(worker_env["CELERY_BROKER_URL"])
    # kombu pops a message (BRPOP) and only then records it as unacknowledged: a worker
    # killed in between loses it for good, so wait until both messages are in `unacked`.
    # (By its task id: the db may hold other tests' unacknowledged messages.)
    wait_until(lambda: broker.llen(worker_env["TEST_QUEUE"]) == 0
               and any(prefetched.id.encode() in v for v in broker.hvals("unacked")), 30,
               "the worker to prefetch the second message (and record it unacknowledged)")
    worker.kill_group()
    start_worker(env=env, concurrency=1)
    assert result.get(timeout=60) == "redelivered run"
    assert prefetched.get(timeout=60) == 42
    [never_started] = executions(receiver, prefetched.id, 1, "t.add", ())
    assert never_started.metadata.get("redelivered") is True
    assert "execution" not in never_started.metadata
    assert never_started.id == root_observation_id_for(prefetched.id)
    assert [r.id for r in receiver.trace(tracing.trace_id_for(prefetched.id)).roots] == [
        never_started.id]
    killed, again = executions(receiver, result.id, 2, "t.redelivered",
                               ("killed-run-llm", "redelivered-run-llm"))
    assert killed.level == "ERROR" and "worker lost" in (killed.status_message or "")
    assert_one_root_tree(receiver, result.id, killed, again)
    by_name = {o.name: o for o in receiver.observations}
    assert by_name["killed-run-llm"].parent_observation_id == killed.id
    assert by_name["redelivered-run-llm"].parent_observation_id == again.id


@pytest.mark.slow
def test_reject_with_requeue_then_redelivered(start_worker, worker_env, receiver):
    """A task that rejects its message with requeue is one REJECTED observation; the
    redelivered run is a second one, under the first."""
    start_worker(concurrency=1)
    result = producer(worker_env).send_task("t.requeue")
    assert result.get(timeout=60) == "second"
    first, again = executions(receiver, result.id, 2, "t.requeue",
                              ("requeued-first-llm", "requeued-second-llm"))
    assert first.metadata.get("final_state") == "REJECTED" and first.level == "WARNING"
    assert again.metadata.get("final_state") == "SUCCESS"
    assert_one_root_tree(receiver, result.id, first, again)


@pytest.mark.slow
def test_eager_re_apply_is_a_second_observation(worker_env, receiver):
    """A task applied eagerly twice with one task id (in a process with a runtime of its
    own) is two observations: the first the trace's root, the second under it."""
    task_id = str(uuid.uuid4())
    script = (
        "from tests.apps import traced_app\n"
        "from tracing.instrumentation import _instrument, _runtime\n"
        "_runtime.start(_instrument._config, ship='thread')\n"
        f"for _ in range(2):\n    traced_app.add.apply(args=(1, 2), task_id={task_id!r})\n"
        "_runtime.stop()\n")
    subprocess.run([sys.executable, "-c", script], env={**os.environ, **worker_env},
                   cwd=Path(__file__).resolve().parent.parent, check=True, timeout=120)
    first, again = executions(receiver, task_id, 2, "t.add", ())
    assert again.metadata.get("execution") == 2
    assert_one_root_tree(receiver, task_id, first, again)

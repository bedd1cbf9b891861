"""The delivery guarantee against real prefork workers: every way a worker process exits.

Each row runs real ``celery worker`` processes on a private redis-server, with the real
Langfuse SDK inside the tasks and the loopback receiver standing in for Langfuse, and
asserts that every generation and every task observation arrived exactly once, by id.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.support import spooled_span_count, wait_until
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow
N = 40


def producer(env: dict[str, str]) -> Celery:
    return Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])


def run_generations(env: dict[str, str], n: int = N, *, wait: bool = True) -> list[str]:
    app = producer(env)
    results = [app.send_task("t.generate", args=[i], queue=env["TEST_QUEUE"]) for i in range(n)]
    if wait:
        for result in results:
            result.get(timeout=60)
    return [r.id for r in results]


def assert_all_once(receiver: LangfuseReceiver, task_ids: list[str], timeout: float = 30) -> None:
    """Every task's observation and its generation arrived, and nothing arrived twice."""
    n = len(task_ids)
    receiver.wait_for(
        lambda obs: len({o.id for o in obs if o.name == "llm"}) >= n
        and len({o.id for o in obs if o.name == "t.generate"}) >= n,
        timeout=timeout, what=f"{n} generations and {n} task observations",
    )
    tasks = [o for o in receiver.observations if o.name == "t.generate"]
    generations = [o for o in receiver.observations if o.name == "llm"]
    assert sorted(o.metadata.get("task_id") for o in tasks) == sorted(task_ids)
    by_id = {o.id: o for o in tasks}
    assert all(g.parent_observation_id in by_id for g in generations), "a generation lost its task"
    assert len(tasks) == n and len(generations) == n
    assert receiver.duplicates() == {}


def test_warm_shutdown(start_worker, worker_env, receiver):
    """A warm shutdown (SIGTERM) delivers all 40 generations and task observations."""
    worker = start_worker()
    ids = run_generations(worker_env)
    assert worker.stop() == 0
    assert_all_once(receiver, ids)


def test_max_tasks_per_child_one(start_worker, worker_env, receiver):
    """Recycling every pool child after one task (os._exit each time) loses nothing."""
    worker = start_worker(extra=("--max-tasks-per-child=1",))
    ids = run_generations(worker_env)
    assert_all_once(receiver, ids)
    assert worker.stop() == 0
    assert receiver.duplicates() == {}


def test_hard_time_limit_closes_the_attempt_under_its_own_ids(start_worker, worker_env, receiver):
    """A task killed by its hard time limit is one ERROR observation with the reason, holding
    the generation it made before the kill."""
    worker = start_worker()
    app = producer(worker_env)
    results = [app.send_task("t.hard", args=[i], queue=worker_env["TEST_QUEUE"]) for i in range(2)]
    for result in results:
        with pytest.raises(Exception, match=r"TimeLimitExceeded|time limit"):
            result.get(timeout=60)
    observations = receiver.wait_for(
        lambda obs: len([o for o in obs if o.name == "t.hard"]) >= 2
        and len([o for o in obs if o.name == "before-the-kill"]) >= 2,
        timeout=30, what="2 hard-limited tasks and their generations",
    )
    tasks = {o.id: o for o in observations if o.name == "t.hard"}
    for task in tasks.values():
        assert task.level == "ERROR"
        assert "time limit" in (task.status_message or "")
    for generation in (o for o in observations if o.name == "before-the-kill"):
        assert generation.parent_observation_id in tasks
    assert worker.stop() == 0
    assert receiver.duplicates() == {}
    assert len([o for o in receiver.observations if o.name == "t.hard"]) == 2


def test_sigkill_of_the_whole_worker_then_restart(
    start_worker, worker_env, receiver, spool_dir
):
    """SIGKILL of the worker's whole process group, then a new worker on the same spool,
    delivers every task observation and generation of the killed run."""
    receiver.down()  # nothing may leave before the kill: the spool alone must carry it
    worker = start_worker()
    ids = run_generations(worker_env)
    # Celery stores a result before task_postrun, where the spans are flushed to the spool:
    # wait for that flush (an event on disk), not for the results alone.
    wait_until(lambda: spooled_span_count(spool_dir) >= 2 * N, 30, "80 spans in the spool")
    worker.kill_group()
    receiver.up()
    assert [r for r in receiver.requests if r.status == 200] == []
    start_worker()
    assert_all_once(receiver, ids)


def test_sigkill_mid_task_closes_the_open_attempt(
    start_worker, worker_env, receiver, spool_dir
):
    """A task running when its whole worker is SIGKILLed is closed as ERROR by the next
    worker's shipper, with the generation it had made hanging under it."""
    # Langfuse is down until the kill: a shipper killed between Langfuse's 200 and its cursor
    # write would resend (outcome unknown), which is not what this row is about.
    receiver.down()
    worker = start_worker()
    app = producer(worker_env)
    app.send_task("t.hard", args=[7], queue=worker_env["TEST_QUEUE"])
    wait_until(lambda: spooled_span_count(spool_dir) >= 1, 30, "the generation in the spool")
    worker.kill_group()
    receiver.up()
    start_worker(env={"TEST_QUEUE": worker_env["TEST_QUEUE"] + "-other"})
    observations = receiver.wait_for(
        lambda obs: any(o.name == "t.hard" for o in obs), timeout=30,
        what="the killed task's observation")
    task = next(o for o in observations if o.name == "t.hard")
    generation = next(o for o in observations if o.name == "before-the-kill")
    assert task.level == "ERROR" and "worker lost" in (task.status_message or "")
    assert generation.parent_observation_id == task.id
    assert receiver.duplicates() == {}


def test_langfuse_down_for_the_whole_run(start_worker, worker_env, receiver):
    """With Langfuse unreachable while the worker runs and stops, the next start ships all."""
    receiver.down()
    worker = start_worker(env={"CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "1"})
    ids = run_generations(worker_env)
    started = time.monotonic()
    assert worker.stop() == 0
    assert time.monotonic() - started < 20, "shutdown must be bounded when Langfuse is down"
    receiver.up()
    start_worker()
    assert_all_once(receiver, ids)


def test_half_of_the_requests_answer_503(start_worker, worker_env, receiver):
    """With 50% of requests answered 503, everything still arrives, exactly once."""
    receiver.set_fail_rate(0.5, status=503, seed=7)
    worker = start_worker()
    ids = run_generations(worker_env)
    assert_all_once(receiver, ids, timeout=60)
    assert any(r.status == 503 for r in receiver.requests)
    worker.stop()


def test_429_storm_honours_retry_after(start_worker, worker_env, receiver):
    """Answered 429 with Retry-After, the shipper sends nothing before the deadline."""
    receiver.fail_next(3, 429, retry_after=1.5)
    worker = start_worker()
    ids = run_generations(worker_env, 10)
    assert_all_once(receiver, ids, timeout=60)
    posts = [r for r in receiver.requests if r.path.endswith("/traces")]
    for before, after in itertools.pairwise(posts):
        if before.status == 429:
            assert after.at - before.at >= 1.5
    worker.stop()


def test_401_pauses_until_keys_are_fixed(start_worker, worker_env, receiver):
    """Wrong keys pause shipping with one clear log line; fixed keys deliver all, once."""
    receiver.set_auth_keys("pk-other", "sk-other")
    worker = start_worker(env={"CELERY_LANGFUSE_AUTH_RETRY_INTERVAL": "1"})
    ids = run_generations(worker_env, 10)
    worker.wait_for_line("HTTP 401", timeout=30)
    receiver.set_auth_keys(worker_env["LANGFUSE_PUBLIC_KEY"], worker_env["LANGFUSE_SECRET_KEY"])
    assert_all_once(receiver, ids, timeout=30)
    worker.stop()
    assert worker.output.count("shipping is paused") == 1


def test_unwritable_spool_dir_never_fails_a_task(start_worker, worker_env, tmp_path):
    """A spool directory that cannot be created leaves tasks succeeding, with a clear log."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    worker = start_worker(env={"CELERY_LANGFUSE_SPOOL_DIR": str(blocker / "spool")})
    assert run_generations(worker_env, 3)
    worker.wait_for_line("Tasks run untraced", timeout=5)
    assert worker.stop() == 0


def test_two_workers_on_one_spool(start_worker, worker_env, receiver):
    """Two workers sharing a spool: one ships at a time, and nothing arrives twice."""
    first = start_worker()
    second = start_worker()
    ids = run_generations(worker_env)
    assert first.stop() == 0
    assert_all_once(receiver, ids)
    assert second.stop() == 0
    assert receiver.duplicates() == {}


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_solo_and_threads_pools_ship_themselves(start_worker, worker_env, receiver, pool):
    """With solo and threads pools the worker process traces and ships its own tasks."""
    worker = start_worker(pool=pool, concurrency=1 if pool == "solo" else 2)
    ids = run_generations(worker_env, 10)
    assert worker.stop() == 0
    assert_all_once(receiver, ids)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 128 KiB tmpfs, to fill up for real (skipped where mounting is not allowed)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_never_fails_a_task(start_worker, worker_env, receiver, tiny_disk):
    """When the spool's disk is full, tasks still succeed and one log line says why."""
    receiver.down()  # nothing ships, so the spool only grows
    worker = start_worker(env={"CELERY_LANGFUSE_SPOOL_DIR": str(tiny_disk / "spool")})
    app = producer(worker_env)
    big = "x" * 20_000  # the input is captured (capped at 32 KiB), filling the disk fast
    results = [app.send_task("t.secret", args=["k", big], queue=worker_env["TEST_QUEUE"])
               for _ in range(30)]
    assert all(r.get(timeout=60)["echo"] == big for r in results)
    worker.wait_for_line("cannot write to the trace spool", timeout=10)
    assert worker.stop() == 0

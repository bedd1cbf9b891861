"""Workers in containers: separate pid namespaces sharing one spool volume.

Each worker runs under ``unshare --pid --fork --mount-proc`` (as a container runtime would
start it: its main process is pid 1 of its own namespace and its pool children get small pids
that repeat from one namespace to the next), all on one spool directory, one Redis, and the
loopback receiver standing in for Langfuse. Needs root (skipped otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support import Process, spooled_span_count, wait_until
from tests.test_lifecycle import assert_all_once, producer, run_generations
from tracing.spool import LOCK_NAME, list_segments, writer_alive, writer_lock_held

pytestmark = pytest.mark.slow

N = 30
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def _can_unshare() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class ContainerWorker(Process):
    """A prefork ``celery worker`` whose processes live in a pid namespace of their own."""

    def __init__(self, env: dict[str, str], queue: str, concurrency: int = 2,
                 app: str = "tests.apps.traced_app") -> None:
        node = f"c{uuid.uuid4().hex[:8]}@%h"
        argv = [*UNSHARE, sys.executable, "-m", "celery", "-A", app,
                "worker", "-P", "prefork", "-c", str(concurrency), "-n", node,
                "--loglevel=INFO", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-Q", queue]
        super().__init__(node, argv, env)

    def wait_ready(self, timeout: float = 60.0) -> ContainerWorker:
        self.wait_for_line(lambda line: line.rstrip().endswith(" ready."), timeout,
                           "being ready")
        return self

    def main_pid(self) -> int:
        """The worker's main process (pid 1 inside; unshare's child outside)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True)
        return int(out.stdout.split()[0])

    def warm_stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the worker's main process (a container runtime's stop); unshare's status."""
        subprocess.run(["kill", "-TERM", str(self.main_pid())], check=True)
        code = self.proc.wait(timeout)
        return code


@pytest.fixture
def start_container(worker_env: dict[str, str]) -> Iterator[Callable[..., ContainerWorker]]:
    """Start workers in pid namespaces of their own; every one is SIGKILLed at the end."""
    if not _can_unshare():
        pytest.skip("unshare --pid needs root (CAP_SYS_ADMIN)")
    started: list[ContainerWorker] = []

    def start(env: dict[str, str] | None = None, **kwargs: str) -> ContainerWorker:
        merged = {**worker_env, **(env or {})}
        worker = ContainerWorker(merged, merged["TEST_QUEUE"], **kwargs)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.kill_group()  # unshare's group holds every process of the namespace


def _status(spool_dir) -> dict[str, object]:
    return dict(json.loads((spool_dir / "shipper-status.json").read_text()))


def test_three_containers_share_one_spool(start_container, worker_env, receiver, spool_dir):
    """Three workers in separate pid namespaces on one spool, Langfuse down, one SIGKILLed,
    Langfuse up, more tasks: every generation and task observation arrives exactly once, and
    no live writer's segment is cut or deleted (the later tasks' spans land in them)."""
    receiver.down()
    containers = [start_container() for _ in range(3)]
    first = run_generations(worker_env, N)
    wait_until(lambda: spooled_span_count(spool_dir) >= 2 * N, 30, f"{2 * N} spans spooled")
    segments = [segment for _, segment in list_segments(spool_dir)]
    writers = {segment.writer for segment in segments}
    assert all(segment.writer for segment in segments), "a segment was named by pid alone"
    assert len(writers) >= 3, f"tasks ran in fewer than 3 pool children: {segments}"
    live_before = {s.writer for s in segments if writer_alive(s)}
    assert live_before == writers, "a live writer in another namespace looked dead"

    containers[1].kill_group()  # a container killed: its namespace goes with it
    wait_until(lambda: any(not writer_alive(s) for s in segments), 10,
               "the killed container's writers to be seen dead")
    dead = [spool_dir / s.name for s in segments if not writer_alive(s)]
    receiver.up()
    assert_all_once(receiver, first, timeout=60)
    # The shipper removes the dead container's shipped segments: that pass is where a live
    # writer taken for dead would lose its segment too.
    wait_until(lambda: not any(path.exists() for path in dead), 30,
               "the killed container's shipped segments to be removed")
    second = run_generations(worker_env, N)  # appended to the survivors' existing segments
    assert_all_once(receiver, first + second, timeout=60)

    for worker in (containers[0], containers[2]):
        assert worker.warm_stop() == 0
    assert receiver.duplicates() == {}
    assert _status(spool_dir)["torn_tails"] == 0
    assert "torn" not in containers[0].output + containers[2].output


def test_a_task_killed_with_its_container_is_closed_once_by_another(
    start_container, worker_env, receiver, spool_dir
):
    """A task running when its container is SIGKILLed is closed as ERROR exactly once by the
    shipper in a third container, its generation under it, while a task running meanwhile in
    another namespace is not taken for dead: it arrives once, as it ended."""
    receiver.down()
    base = worker_env["TEST_QUEUE"]
    shipper = start_container({"TEST_QUEUE": base + "-idle"}, app="tests.apps.long_app")
    # It holds the shipper lock from now on (flock works across the namespaces).
    wait_until(lambda: writer_lock_held(spool_dir / LOCK_NAME), 30, "the first shipper's lock")
    doomed = start_container({"TEST_QUEUE": base + "-doomed"}, app="tests.apps.long_app")
    survivor = start_container({"TEST_QUEUE": base + "-survivor"}, app="tests.apps.long_app")
    app = producer(worker_env)
    app.send_task("t.long", args=[60], queue=base + "-doomed")
    lives = app.send_task("t.long", args=[10], queue=base + "-survivor")
    wait_until(lambda: spooled_span_count(spool_dir) >= 2, 30, "both tasks' generations")
    doomed.kill_group()
    receiver.up()
    assert lives.get(timeout=60) == 10
    observations = receiver.wait_for(
        lambda obs: len([o for o in obs if o.name == "t.long"]) >= 2
        and len([o for o in obs if o.name == "before-the-kill"]) >= 2,
        timeout=60, what="both tasks and both generations")
    tasks = {o.level: o for o in observations if o.name == "t.long"}
    assert set(tasks) == {"ERROR", "DEFAULT"}, [o.status_message for o in tasks.values()]
    assert "worker lost" in (tasks["ERROR"].status_message or "")
    parents = sorted(o.parent_observation_id or "" for o in observations
                     if o.name == "before-the-kill")
    assert parents == sorted(o.id for o in tasks.values())
    for worker in (shipper, survivor):
        assert worker.warm_stop() == 0
    assert receiver.duplicates() == {}
    assert len([o for o in receiver.observations if o.name == "t.long"]) == 2


def test_a_spool_left_by_an_earlier_version_is_adopted_and_shipped(receiver, tmp_path):
    """Segments named by pid (an earlier version's spool), with their cursors, are adopted
    after an upgrade: what was past the cursor arrives exactly once, what was before it never."""
    from tests.test_handoff import span_record
    from tracing import load_config
    from tracing.shipping._shipper import ShipperCore
    from tracing.spool import (
        KIND_SPAN,
        SegmentWriter,
        encode_frame,
        ensure_spool_dir,
        segment_name,
        write_cursor,
    )
    from tracing.spool._exporter import SpoolExporter

    spool = ensure_spool_dir(tmp_path / "spool")
    records = [span_record(f"old-{i}") for i in range(10)]
    frames = [encode_frame(KIND_SPAN, payload) for _, payload in records]
    old = spool / segment_name(4242, 1, 0)  # pid 4242 started at tick 1: long gone
    old.write_bytes(b"".join(frames))
    write_cursor(old, sum(len(f) for f in frames[:4]))  # the old shipper had sent 4
    config = load_config(environ={}, public_key=receiver.public_key,
                         secret_key=receiver.secret_key, base_url=receiver.base_url,
                         spool_dir=str(spool), handoff_url="off")
    ShipperCore(config, SpoolExporter(SegmentWriter(spool))).drain(30)
    assert sorted(o.id for o in receiver.observations) == sorted(s for s, _ in records[4:])
    assert receiver.duplicates() == {}
    assert not old.exists(), "the adopted segment was not removed once shipped"

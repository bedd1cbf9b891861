"""A full disk (issue 23 §1): a spool on a real 1 MiB tmpfs, real prefork workers, a real
Redis and the loopback receiver. Nothing arrives twice, the shipper frees space as Langfuse
takes records, and every span that could not be stored is counted, so arrived + counted =
produced. Mounting a tmpfs needs root: elsewhere the tests skip, saying so.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.support import wait_until
from tracing.shipping._status import read_status
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow

PAYLOAD = "x" * 4096  # the task's input and its output: about 9 KB of spool per task


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted as the spool directory (skips where mounting is not allowed)."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                              str(spool)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def producer(env: dict[str, str]) -> Celery:
    return Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])


def run_echoes(env: dict[str, str], n: int) -> list[str]:
    """``n`` t.echo tasks with a 4 KiB payload, all waited for; every one must succeed."""
    app = producer(env)
    results = [app.send_task("t.echo", args=[PAYLOAD], queue=env["TEST_QUEUE"])
               for _ in range(n)]
    assert [r.get(timeout=120) for r in results] == [PAYLOAD] * n  # tracing never fails a task
    return [r.id for r in results]


def arrived_again(receiver: LangfuseReceiver, task_ids: list[str]) -> None:
    """Wait until the t.echo tasks run after Langfuse came back have all arrived."""
    receiver.wait_for(
        lambda obs: {o.metadata.get("task_id") for o in obs if o.name == "t.echo"}
        >= set(task_ids),
        timeout=60, what=f"the {len(task_ids)} tasks run after Langfuse came back")


def caught_up(spool: Path) -> None:
    """Wait until the shipper reports its spool shipped (Langfuse took everything)."""
    wait_until(lambda: (read_status(spool) or {}).get("pending_bytes", 1) == 0
               and (read_status(spool) or {}).get("last_status") == 200,
               timeout=90, what="the shipper to ship the full spool once Langfuse is back")


def drain(env: dict[str, str]) -> str:
    """``python -m tracing drain`` on the spool (it closes the dead workers' open attempts)."""
    out = subprocess.run([sys.executable, "-m", "tracing", "drain", "--timeout", "30"],
                         env=env, capture_output=True, text=True, timeout=90)
    return out.stdout + out.stderr


def closing(o: Any) -> bool:
    """A closing observation written for an attempt whose own span never came."""
    return o.name == "t.echo" and o.level == "ERROR"


def test_full_disk_loses_count_not_duplicates(
    start_worker: Any, worker_env: dict[str, str], receiver: LangfuseReceiver, tiny_spool: Path
) -> None:
    """With Langfuse answering 503 while 200 tasks fill a 1 MiB spool, no span arrives twice,
    every span not stored is counted by cause (arrived + counted = produced), status stays
    readable, and once Langfuse is back the freed disk carries 20 new tasks' spans."""
    env = {**worker_env, "CELERY_LANGFUSE_SPOOL_DIR": str(tiny_spool),
           "CELERY_LANGFUSE_HANDOFF_URL": "off"}
    receiver.set_fail_rate(1.0, 503)
    worker = start_worker(env=env)
    first = run_echoes(env, 200)
    wait_until(lambda: (read_status(tiny_spool) or {}).get("dropped_in_writers"), timeout=30,
               what="the status (readable on the full disk) to count the dropped spans")
    node = worker.name.replace("%h", socket.gethostname())
    [answer] = producer(env).control.broadcast("langfuse_status", destination=[node],
                                               reply=True, timeout=10, limit=1)
    shipper = answer[node]["shipper"]
    assert shipper["dropped_in_writers"].get("disk_full", 0) > 0 and shipper["lost_spans"] > 0
    receiver.set_fail_rate(0.0)
    caught_up(tiny_spool)
    later = run_echoes(env, 20)
    arrived_again(receiver, later)
    assert worker.stop() == 0
    stop_log = worker.output
    drained = drain({**env, "CELERY_LANGFUSE_SPOOL_DIR": str(tiny_spool)})

    status = read_status(tiny_spool) or {}
    spans = [o for o in receiver.observations if not closing(o)]
    produced = 2 * (len(first) + len(later))  # the task's observation and its generation
    lost = status.get("lost_spans", 0)
    report = {"produced": produced, "arrived": len({o.id for o in spans}),
              "duplicates": len(receiver.duplicates()), "lost": lost,
              "by_cause": status.get("dropped_in_writers"),
              "closed_as_not_stored": len([o for o in receiver.observations if closing(o)])}
    print(json.dumps(report))
    assert receiver.duplicates() == {}
    # A second shipper on the spool resends nothing: it ships only the closing observations.
    assert f"shipped {report['closed_as_not_stored']} span(s)" in drained, drained
    assert report["arrived"] + lost == produced, (report, drained)
    assert lost == sum((status.get("dropped_in_writers") or {}).values())
    assert (status.get("dropped_in_writers") or {}).get("disk_full", 0) > 0
    assert "killed mid-write" not in stop_log
    # Every span was delivered or counted: the stop line may name open attempts, no spans.
    assert " span(s), " not in stop_log or "stopping with 0 span(s)" in stop_log, stop_log
    for o in receiver.observations:
        if closing(o):
            assert o.status_message and o.status_message.startswith(
                "span record not stored"), o.status_message


def test_cap_frees_space_on_a_full_disk(
    start_worker: Any, worker_env: dict[str, str], receiver: LangfuseReceiver, tiny_spool: Path
) -> None:
    """With CELERY_LANGFUSE_SPOOL_MAX_BYTES set and Langfuse down, the cap's cursor writes
    still work on the full disk: shipping goes on and new spans arrive once it is back."""
    env = {**worker_env, "CELERY_LANGFUSE_SPOOL_DIR": str(tiny_spool),
           "CELERY_LANGFUSE_HANDOFF_URL": "off", "CELERY_LANGFUSE_SPOOL_MAX_BYTES": "524288"}
    receiver.set_fail_rate(1.0, 503)
    worker = start_worker(env=env)
    first = run_echoes(env, 120)
    receiver.set_fail_rate(0.0)
    caught_up(tiny_spool)
    later = run_echoes(env, 20)
    arrived_again(receiver, later)
    assert worker.stop() == 0
    status = read_status(tiny_spool) or {}
    arrived = len({o.id for o in receiver.observations if not closing(o)})
    report = {"produced": 2 * (len(first) + len(later)), "arrived": arrived,
              **{k: status.get(k) for k in ("dropped_at_cap", "dropped_in_writers", "lost_spans",
                                            "cursor_write_failures")}}
    print(json.dumps(report))
    assert status.get("dropped_at_cap", 0) > 0 and status.get("cursor_write_failures") == 0
    assert receiver.duplicates() == {}
    assert arrived + status.get("lost_spans", 0) == report["produced"], report

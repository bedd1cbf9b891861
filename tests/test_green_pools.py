"""gevent and eventlet pools: real workers, the no-loss promise and nesting under green threads.

Under a green pool the SDK's export thread is a greenlet: it cannot run while a task makes
spans without yielding, and OpenTelemetry drops spans once its 2048-span queue is full. The
span guard moves them to the spool every 256 spans instead (``tracing/instrumentation/_otel.py``).
"""

from __future__ import annotations

import pytest
from celery import Celery

from tests.test_lifecycle import assert_all_once, run_generations
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_green_pool_keeps_every_span_and_nests_each_under_its_task(
    start_worker, worker_env: dict[str, str], receiver: LangfuseReceiver, pool: str
) -> None:
    """A task making 5000 generations without yielding delivers all 5000 (none dropped at
    the SDK's queue), and 50 concurrent tasks each get their own generation under them."""
    pytest.importorskip(pool)
    worker = start_worker(pool=pool, concurrency=50)
    producer = Celery(broker=worker_env["CELERY_BROKER_URL"],
                      backend=worker_env["CELERY_RESULT_BACKEND"])
    bulk = producer.send_task("t.many", args=[5000], queue=worker_env["TEST_QUEUE"])
    assert bulk.get(timeout=120) == 5000
    ids = run_generations(worker_env, 50)
    assert worker.stop() == 0
    assert_all_once(receiver, ids, timeout=60)
    receiver.wait_for(lambda obs: len({o.id for o in obs if o.name == "bulk"}) >= 5000,
                      timeout=60, what="5000 bulk generations")
    [task] = [o for o in receiver.observations if o.metadata.get("task_id") == bulk.id]
    bulk_generations = [o for o in receiver.observations if o.name == "bulk"]
    assert len(bulk_generations) == 5000
    assert {g.parent_observation_id for g in bulk_generations} == {task.id}
    assert "Queue full" not in worker.output_tail(400)

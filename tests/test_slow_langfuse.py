"""Langfuse slower than the HTTP timeout (issue 23 §4), with a real prefork worker, a real
Redis and the loopback receiver, which stores every request it got even after the shipper
stopped waiting for its answer (as Langfuse does): each resend is a copy in Langfuse.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery

from tracing.shipping._status import read_status
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow


def test_slow_langfuse_costs_at_most_one_extra_copy_per_span(
    start_worker: Any, worker_env: dict[str, str], receiver: LangfuseReceiver, spool_dir: Any
) -> None:
    """LANGFUSE_TIMEOUT=2 while every answer takes 5 s: all spans arrive, none more than
    twice, and the status counts exactly the copies sent again."""
    env = {**worker_env, "LANGFUSE_TIMEOUT": "2", "CELERY_LANGFUSE_HANDOFF_URL": "off"}
    receiver.set_latency(5.0)
    worker = start_worker(env=env)
    app = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
    ids: list[str] = []
    for wave in range(6):  # spans keep coming while Langfuse is slow
        results = [app.send_task("t.generate", args=[wave * 10 + i], queue=env["TEST_QUEUE"])
                   for i in range(10)]
        ids += [r.id for r in results]
        for result in results:
            result.get(timeout=60)
        receiver.wait_for(lambda obs, n=wave: len({o.id for o in obs}) >= 2 * 10 * n,
                          timeout=60, what="the previous wave to arrive, slowly")
    receiver.wait_for_count(2 * len(ids), timeout=90)
    receiver.set_latency(0.0)
    assert worker.stop() == 0
    copies = receiver.observations_by_id()
    extra = sum(len(c) - 1 for c in copies.values())
    status = read_status(spool_dir) or {}
    print(json.dumps({"spans": len(copies), "extra_copies": extra,
                      "most_copies": max(len(c) for c in copies.values()),
                      "resent_spans": status.get("resent_spans")}))
    assert len(copies) == 2 * len(ids)
    assert max(len(c) for c in copies.values()) <= 2
    assert status.get("resent_spans") == extra

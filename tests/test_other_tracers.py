"""Beside the application's own OpenTelemetry (and Sentry) setup: a real prefork worker whose
app registered a global TracerProvider with its own exporter before ``instrument()``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from celery import Celery
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

import tracing
from tests.support import RedisServer, WorkerProcess
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow


def test_langfuse_spans_stay_apart_from_the_apps_tracer(
    redis_server: RedisServer, receiver: LangfuseReceiver, tmp_path: Path
) -> None:
    """The app's exporter never sees a Langfuse span (no task input leaks to it); a
    generation made inside one of the app's spans hangs under its task, not under a span
    Langfuse never receives; LANGFUSE_SAMPLE_RATE keeps exactly the traces its ratio says."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app_spans = tmp_path / "app-spans.jsonl"
    env = {
        "CELERY_BROKER_URL": f"{redis_server.url}/14",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/14",
        "TEST_QUEUE": queue,
        "TEST_APP_SPANS": str(app_spans),
        "LANGFUSE_PUBLIC_KEY": receiver.public_key,
        "LANGFUSE_SECRET_KEY": receiver.secret_key,
        "LANGFUSE_BASE_URL": receiver.base_url,
        "LANGFUSE_SAMPLE_RATE": "0.5",
        "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path / "spool"),
        "PYTHONUNBUFFERED": "1",
    }
    worker = WorkerProcess("tests.apps.otel_app", env, queue=queue)
    try:
        worker.wait_ready()
        producer = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
        results = [producer.send_task("o.nested", args=[i], queue=queue) for i in range(20)]
        assert [r.get(timeout=60) for r in results] == list(range(20))
        bound = TraceIdRatioBased.get_bound_for_rate(0.5)
        kept = {r.id for r in results
                if int(tracing.trace_id_for(r.id), 16) & TraceIdRatioBased.TRACE_ID_LIMIT < bound}
        assert 0 < len(kept) < 20, "the ratio should keep some and drop some of 20 traces"
        assert worker.stop() == 0
    finally:
        worker.kill_group()
    tasks = receiver.wait_for(
        lambda obs: len([o for o in obs if o.name == "o.nested"]) >= len(kept),
        timeout=30, what="the sampled task observations")
    received = {o.metadata.get("task_id") for o in tasks if o.name == "o.nested"}
    assert received == kept
    by_id = {o.id: o for o in receiver.observations}
    generations = [o for o in receiver.observations if o.name == "llm"]
    assert len(generations) == len(kept)
    for generation in generations:
        parent = by_id[generation.parent_observation_id or ""]
        assert parent.name == "o.nested" and not generation.is_app_root
    lines = [json.loads(line) for line in app_spans.read_text().splitlines()]
    assert {line["name"] for line in lines} == {"app-work"}
    assert not any(line["scope"] == "langfuse-sdk" for line in lines)

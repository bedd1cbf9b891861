"""Corrupt segments (issue 23 §3) with a real worker: the spans lost in corrupt bytes are
counted, and a task whose span record was among them is reported as such, not as a lost
worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tracing.shipping._status import read_status
from tracing.spool import KIND_OPEN, KIND_SPAN, list_segments, scan_file
from tracing.spool._attempts import OpenAttempt
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow


def flip_task_span(spool: Path) -> str:
    """Flip one byte inside the span record of the first task that has one; its span id."""
    for path, _ in list_segments(spool):
        records = scan_file(path).records
        opened = [OpenAttempt.from_payload(r.payload).span_id
                  for r in records if r.kind == KIND_OPEN]
        for record in records[:-1]:  # followed by a whole record: corrupt, not a torn tail
            if record.kind == KIND_SPAN and record.payload[:8].hex() in opened:
                data = bytearray(path.read_bytes())
                data[(record.offset + record.end) // 2] ^= 0x40
                path.write_bytes(bytes(data))
                return str(record.payload[:8].hex())
    raise AssertionError(f"no task span record found in {spool}")


def test_a_task_whose_span_record_is_corrupt_is_closed_as_unreadable(
    start_worker: Any, worker_env: dict[str, str], receiver: LangfuseReceiver, spool_dir: Path
) -> None:
    """Five tasks shipped after their worker stopped, one task's span record corrupted on
    disk: the other records arrive, that task's observation says its span record was
    unreadable (never "worker lost"), and the status counts one unreadable span."""
    env = {**worker_env, "CELERY_LANGFUSE_HANDOFF_URL": "off",
           "CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "1"}
    receiver.down()
    worker = start_worker(env=env)
    app = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
    results = [app.send_task("t.generate", args=[i], queue=env["TEST_QUEUE"]) for i in range(5)]
    for result in results:
        result.get(timeout=60)
    assert worker.stop() == 0
    victim = flip_task_span(spool_dir)
    receiver.up()
    subprocess.run([sys.executable, "-m", "tracing", "drain", "--timeout", "30"], env=env,
                   capture_output=True, text=True, timeout=90)
    tasks = receiver.wait_for_count(5, name="t.generate", timeout=30)
    assert len({o.id for o in receiver.observations if o.name == "llm"}) == 5
    [closed] = [o for o in tasks if o.id == victim]
    assert closed.level == "ERROR"
    assert closed.status_message and closed.status_message.startswith("span record unreadable")
    assert all(o.level != "ERROR" for o in tasks if o.id != victim)
    status = read_status(spool_dir) or {}
    assert status.get("unreadable_spans") == 1 and status.get("corrupt_records") == 1
    assert status.get("lost_spans") == 1
    assert receiver.duplicates() == {}

"""Remote control never stalls a worker: ``inspect langfuse_status`` answers from the shipper's
kept state (never reading the spool) and ``control langfuse_flush`` never waits (issue 12)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery

from tracing import load_config
from tracing.instrumentation import _remote, _runtime
from tracing.shipping import _reader
from tracing.shipping._shipper import Shipper
from tracing.spool import KIND_SPAN, SegmentWriter, encode_frame
from tracing.spool._exporter import SpoolExporter


def fake_runtime(spool: Path) -> SimpleNamespace:
    config = load_config(environ={}, public_key="pk-lf-remote", secret_key="sk-lf-remote",
                         base_url="http://127.0.0.1:9", spool_dir=str(spool))
    exporter = SpoolExporter(SegmentWriter(spool))
    shipper = Shipper(config, exporter)
    flushed = threading.Event()
    return SimpleNamespace(config=config, exporter=exporter, shipper=shipper,
                           flush=flushed.set, flushed=flushed)


def test_status_and_flush_never_touch_the_spool(tmp_path, monkeypatch):
    """Both commands answer from kept state in well under 50 ms, reading no segment."""
    spool = tmp_path / "spool"
    runtime = fake_runtime(spool)
    writer = SegmentWriter(spool, max_segment_bytes=1 << 20)
    frame = encode_frame(KIND_SPAN, bytes(24) + b"x" * 4000)
    for _ in range(64):
        writer.append(frame * 64)  # 16 MB in 16 segments
    runtime.shipper.reader.pending_bytes()  # what a shipper cycle keeps
    monkeypatch.setattr(_runtime, "current", lambda: runtime)

    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("a remote-control command read the spool")

    for name in ("list_segments", "scan_file", "read_cursor"):
        monkeypatch.setattr(_reader, name, forbidden)
    started = time.perf_counter()
    status = _remote.langfuse_status(None)
    flush = _remote.langfuse_flush(None, timeout=5)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05
    assert status["spool"]["unshipped_bytes"] >= 64 * 64 * len(frame)  # and seal frames
    assert status["shipper"]["pending_bytes"] == status["spool"]["unshipped_bytes"]
    assert flush["ok"] and flush["requested"] and runtime.flushed.is_set()
    assert runtime.shipper._wake.is_set(), "the flush woke the shipper"


@pytest.mark.slow
def test_tasks_keep_flowing_while_the_operator_flushes(start_worker, worker_env, receiver):
    """With Langfuse down, flush (timeout 5) and status answer at once and tasks complete
    meanwhile: the consumer loop is never held by a command."""
    receiver.down()
    worker = start_worker()
    app = Celery(broker=worker_env["CELERY_BROKER_URL"],
                 backend=worker_env["CELERY_RESULT_BACKEND"])
    node = worker.name.replace("%h", socket.gethostname())
    answering(app, node)
    started = time.monotonic()
    flush = app.control.broadcast("langfuse_flush", arguments={"timeout": 5},
                                  destination=[node], reply=True, timeout=10, limit=1)
    flush_s = time.monotonic() - started
    results = [app.send_task("t.generate", args=[i], queue=worker_env["TEST_QUEUE"])
               for i in range(10)]
    started = time.monotonic()
    status = app.control.broadcast("langfuse_status", destination=[node], reply=True,
                                   timeout=10, limit=1)
    status_s = time.monotonic() - started
    for result in results:
        result.get(timeout=30)
    assert flush and flush[0][node]["ok"] is True
    assert status and status[0][node]["tracing"] == "on"
    assert flush_s < 2.0 and status_s < 2.0, (flush_s, status_s)
    assert worker.stop() == 0


def answering(app: Celery, node: str, timeout: float = 20.0) -> None:
    """Wait until ``node`` answers a control ping: "ready" in its log can come before its
    broadcast subscription is live on Redis (a broadcast then reaches nobody)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.control.ping(destination=[node], timeout=0.5):
            return
    raise AssertionError(f"worker {node} answered no control ping within {timeout:.0f} s")

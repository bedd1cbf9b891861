"""Shipper throughput and backlog recovery, from a prepared spool to the loopback receiver.

The spool is written the way workers write it: real SDK ``ReadableSpan`` objects (a task
observation and its generation, captured from the real Langfuse SDK, then cloned with fresh
trace/span ids so every span is distinct) encoded by the real exporter's ``span_frame`` and
appended by a real ``SegmentWriter`` in batches, like the batch processor's exports.

The receiver runs in its own process (``python -m tracing.testing``) so the shipper does not
share its interpreter lock; the shipper runs ``Shipper.drain``, gzip on, in a fresh process
of its own (``bench._drain``), as ``python -m tracing drain`` would. A second figure, the same
drain into a transport that gzips and discards, is the shipper's own ceiling on this machine.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._procs import ROOT, ReceiverProcess

SPANS_PER_APPEND = 64


def _templates() -> list[Any]:
    """A real task span and its generation from the SDK (ended, as exported)."""
    from bench.inprocess import _capture, _one_task_of_spans, traced_runtime

    with tempfile.TemporaryDirectory() as scratch, traced_runtime(Path(scratch)) as (_, rt):
        captured: list[Any] = []
        undo = _capture(rt.client, captured)
        try:
            _one_task_of_spans(rt.client)
        finally:
            undo()
    return sorted(captured, key=lambda s: s.parent is not None)  # task first, then generation


def _clone(span: Any, trace_id: int, span_id: int, parent_id: int | None) -> Any:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, TraceFlags

    context = SpanContext(trace_id, span_id, False, TraceFlags(1))
    parent = SpanContext(trace_id, parent_id, False, TraceFlags(1)) if parent_id else None
    return ReadableSpan(
        name=span.name, context=context, parent=parent, resource=span.resource,
        attributes=span.attributes, events=span.events, links=span.links, kind=span.kind,
        instrumentation_scope=span.instrumentation_scope, status=span.status,
        start_time=span.start_time, end_time=span.end_time,
    )


def prepare_spool(spool_dir: Path, spans: int, seed: int = 7) -> dict[str, Any]:
    """Write ``spans`` span records (task + generation pairs) into a fresh spool."""
    from tracing._exporter import span_frame
    from tracing._spool import SegmentWriter

    task, generation = _templates()
    rng = random.Random(seed)
    writer = SegmentWriter(spool_dir)
    started = time.perf_counter()
    batch: list[bytes] = []
    written = 0
    while written < spans:
        trace_id, task_id = rng.getrandbits(128) or 1, rng.getrandbits(64) or 1
        batch.append(span_frame(_clone(task, trace_id, task_id, None)))
        written += 1
        if written < spans:
            batch.append(span_frame(_clone(generation, trace_id, rng.getrandbits(64) or 1,
                                           task_id)))
            written += 1
        if len(batch) >= SPANS_PER_APPEND:
            writer.append(b"".join(batch))
            batch = []
    if batch:
        writer.append(b"".join(batch))
    writer.close()
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in spool_dir.glob("seg-*.spool"))
    return {"spans": written, "bytes": size, "prepare_s": round(seconds, 2)}


class DiscardTransport:
    """Gzips each body like the HTTP transport and answers 200: the shipper's own ceiling."""

    def __init__(self) -> None:
        self.bodies = 0

    def send(self, body: bytes, timeout: float) -> Any:
        from tracing._delivery import SendResult

        gzip.compress(body, compresslevel=5)
        self.bodies += 1
        return SendResult(200)

    def close(self) -> None:
        pass


def drain(spool_dir: Path, base_url: str, keys: tuple[str, str], *,
          transport: Any = None, timeout: float = 600.0) -> dict[str, Any]:
    """``Shipper.drain`` the spool; spans/s over the whole drain."""
    from tracing import load_config
    from tracing._exporter import SpoolExporter
    from tracing._shipper import Shipper
    from tracing._spool import SegmentWriter

    config = load_config(public_key=keys[0], secret_key=keys[1], base_url=base_url,
                         spool_dir=str(spool_dir), spool_max_bytes="64GB")
    shipper = Shipper(config, SpoolExporter(SegmentWriter(spool_dir)), transport=transport)
    cpu_started, started = time.process_time(), time.perf_counter()
    stats = shipper.drain(timeout)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    shipper.transport.close()
    return {"shipped_spans": stats.shipped_spans, "requests": stats.requests,
            "seconds": round(seconds, 3),
            "spans_per_s": round(stats.shipped_spans / seconds, 1) if seconds else 0.0,
            "shipper_cpu_s": round(cpu, 3), "left_bytes": shipper.pending_bytes()}


TARGETS = ("receiver", "sink", "discard")


def ship_prepared(prepared: Path, scratch: Path, target: str) -> dict[str, Any]:
    """Copy the prepared spool (a drain consumes it) and drain the copy into ``target``.

    ``receiver``: ``tracing.testing.LangfuseReceiver`` in its own process; ``sink``: the
    minimal OTLP sink
    (``bench._sink``); ``discard``: gzip and drop, in this process.
    """
    name = f"{target}-{os.getpid()}-{time.monotonic_ns()}"
    spool = scratch / name
    shutil.copytree(prepared, spool)
    keys = (f"pk-lf-{name}", f"sk-lf-{name}")
    try:
        if target == "discard":
            return {"target": target, **_drain_in_subprocess(spool, "http://127.0.0.1:9", keys,
                                                             discard=True)}
        module = "tracing.testing" if target == "receiver" else "bench._sink"
        receiver = ReceiverProcess(*keys, module=module)
        try:
            result = {"target": target, **_drain_in_subprocess(spool, receiver.base_url, keys)}
            result.update(_received(receiver, target))
            return result
        finally:
            receiver.stop()
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _drain_in_subprocess(spool: Path, base_url: str, keys: tuple[str, str], *,
                         discard: bool = False) -> dict[str, Any]:
    """``drain`` in a fresh interpreter (see ``bench._drain`` for why)."""
    args = [sys.executable, "-m", "bench._drain", str(spool), base_url, *keys]
    done = subprocess.run(args + (["--discard"] if discard else []), cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"drain failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _received(receiver: ReceiverProcess, target: str) -> dict[str, int]:
    if target == "sink":
        stats = receiver.sink_stats()
        return {"received_spans": stats["unique"],
                "received_duplicates": stats["spans"] - stats["unique"]}
    ids = receiver.accepted_span_ids()
    return {"received_spans": len(set(ids)), "received_duplicates": len(ids) - len(set(ids))}


def prepared_spool(scratch: Path, spans: int) -> tuple[Path, dict[str, Any]]:
    path = scratch / f"prepared-{spans}"
    info = prepare_spool(path, spans)
    os.sync()  # the copies and drains read from the page cache, not a dirty writeback
    return path, info

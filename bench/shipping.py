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
from bench._rows import emit_row

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
    from tracing.spool import SegmentWriter
    from tracing.spool._exporter import span_frame

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
        from tracing.shipping._delivery import SendResult

        gzip.compress(body, compresslevel=1)  # HttpTransport's level
        self.bodies += 1
        return SendResult(200)

    def close(self) -> None:
        pass


def drain(spool_dir: Path, base_url: str, keys: tuple[str, str], *,
          transport: Any = None, timeout: float = 600.0) -> dict[str, Any]:
    """``Shipper.drain`` the spool; spans/s over the whole drain."""
    from tracing import load_config
    from tracing.shipping._shipper import Shipper
    from tracing.spool import SegmentWriter
    from tracing.spool._exporter import SpoolExporter

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


# --------------------------------------------------------------------------- before / after


def _in_tree(root: Path, code: str, *args: str) -> Any:
    """Run ``code`` (which prints one JSON line) in a fresh interpreter importing ``root``."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True,
                          text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rev(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, text=True,
                          capture_output=True, check=True, timeout=60).stdout.strip()


def _extract(commit: str, into: Path) -> Path:
    """The code of ``commit`` (tracing, bench, tests, harness) in ``into``: a snapshot that
    edits in the working tree during the run cannot change."""
    into.mkdir()
    listed = subprocess.run(["git", "ls-tree", "--name-only", commit], cwd=ROOT, text=True,
                            capture_output=True, check=True, timeout=60).stdout.split()
    paths = [p for p in ("tracing", "bench", "tests", "harness") if p in listed]
    archive = subprocess.run(["git", "archive", commit, *paths], cwd=ROOT,
                             capture_output=True, check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=120)
    return into


_PREPARE = ("import json, sys, tracing; from pathlib import Path; "
            "from bench.shipping import prepare_spool; "
            "print(json.dumps({**prepare_spool(Path(sys.argv[1]), int(sys.argv[2])), "
            "'tracing': tracing.__file__}))")


def compare_versions(before: str, spans: int, rounds: int, scratch: Path) -> list[dict[str, Any]]:
    """The shipper of commit ``before`` and of HEAD, side by side, rounds alternated.

    Each version writes its own spool (its own record form) with its own ``prepare_spool``
    and drains a fresh copy of it in a fresh interpreter, into the same minimal sink and
    into the gzip-and-discard transport. ``spans_per_cpu_s`` is spans per second of the
    shipper's own CPU: spans/s per core.
    """
    commits = {"before": _rev(before), "after": _rev("HEAD")}
    roots = {"before": _extract(before, scratch / "before"),
             "after": _extract("HEAD", scratch / "after")}
    prepared = {}
    for label, root in roots.items():
        info = _in_tree(root, _PREPARE, str(scratch / f"prepared-{label}"), str(spans))
        if not info["tracing"].startswith(str(root)):
            raise RuntimeError(f"{label} imported {info['tracing']}, not {root}")
        prepared[label] = (scratch / f"prepared-{label}", info)
    keys = ("pk-lf-compare", "sk-lf-compare")
    sink = ReceiverProcess(*keys, module="bench._sink")
    results: list[dict[str, Any]] = []
    try:
        for round_no in range(rounds):
            order = list(roots) if round_no % 2 == 0 else list(reversed(list(roots)))
            for label in order:
                for target in ("sink", "discard"):
                    spool = scratch / f"{label}-{round_no}-{target}"
                    shutil.copytree(prepared[label][0], spool)
                    args = [sys.executable, "-m", "bench._drain", str(spool),
                            sink.base_url if target == "sink" else "http://127.0.0.1:9", *keys]
                    done = subprocess.run(args + (["--discard"] if target == "discard" else []),
                                          cwd=roots[label], capture_output=True, text=True,
                                          timeout=900, check=False)
                    shutil.rmtree(spool, ignore_errors=True)
                    if done.returncode != 0:
                        raise RuntimeError(f"{label} drain failed: {done.stderr[-2000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    cpu = result["shipper_cpu_s"]
                    results.append({
                        "version": label, "commit": commits[label],
                        "target": target, "round": round_no,
                        "spool_bytes": prepared[label][1]["bytes"],
                        "spans_per_cpu_s": round(result["shipped_spans"] / cpu, 1) if cpu else 0,
                        **result,
                    })
        results.append({"version": "sink", **sink.sink_stats()})
    finally:
        sink.stop()
    return results


def main() -> None:
    import argparse
    import platform

    parser = argparse.ArgumentParser(prog="python -m bench.shipping", description=(
        "Shipper throughput of an earlier commit and of this tree, side by side."))
    parser.add_argument("--before", help="commit whose shipper to compare with this tree's")
    parser.add_argument("--placement", action="store_true",
                        help="shipper thread in the main process vs shipping process")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per placement run")
    parser.add_argument("--spool-costs", type=int, default=0, metavar="N",
                        help="also N iterations of bench.inprocess.spool_costs (append/span)")
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args()
    command = "python -m bench.shipping " + " ".join(sys.argv[1:])
    if not args.before and not args.placement and not args.spool_costs:
        parser.error("give --before COMMIT, --placement and/or --spool-costs N")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.spool_costs:
            from bench.inprocess import spool_costs

            rows.append({"bench": "spool_costs",
                         **spool_costs(Path(scratch) / "costs", args.spool_costs)})
        if args.before:
            rows += [{"bench": "shipper_versions", **row} for row in
                     compare_versions(args.before, args.spans, args.rounds, Path(scratch))]
        if args.placement:
            rows += [{"bench": "shipper_placement", **row} for row in
                     compare_placements(args.tasks, args.rounds, Path(scratch))]
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for row in rows:
        line = {"at": at, "load_avg_1m": os.getloadavg()[0],
                **row, "command": command, "python": platform.python_version()}
        emit_row(line, args.out)


# --------------------------------------------------------------------------- placement

PLACEMENTS = {"thread": "bench.apps.instrumented_thread_shipper",
              "process": "bench.apps.instrumented"}


def _cpu(pid: int) -> float:
    from bench.throughput import cpu_seconds

    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return 0.0


def _shipper_pids(main_pid: int) -> list[int]:
    from bench._procs import children_of

    found = []
    for pid in children_of(main_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"tracing.shipping._shipper_main" in cmdline:
            found.append(pid)
    return found


def placement_once(harness: Any, placement: str, tasks: int, work_ms: float) -> dict[str, Any]:
    """A prefork worker (-c 2), ``tasks`` traced tasks; CPU of main, pool, shipper process."""
    import uuid

    from bench._procs import Worker, children_of
    from bench.throughput import WARMUP_TASKS, generations, run_tasks, wait_delivered

    receiver = harness.receiver
    receiver.clear()
    queue = f"place-{placement}-{uuid.uuid4().hex[:6]}"
    worker = Worker(PLACEMENTS[placement], harness.worker_env(queue, harness.scratch / queue))
    producer = harness.producer()
    try:
        worker.wait_ready()
        run_tasks(producer, queue, range(-WARMUP_TASKS, 0), work_ms)
        # measure from when the warm-up arrived: the shipper (thread or process) is running
        wait_delivered(receiver, WARMUP_TASKS, 60.0)
        main = worker.proc.pid
        shippers = _shipper_pids(main)
        pool = [pid for pid in children_of(main) if pid not in shippers]
        before = (_cpu(main), sum(map(_cpu, pool)), sum(map(_cpu, shippers)))
        seconds = run_tasks(producer, queue, range(tasks), work_ms)
        after = (_cpu(main), sum(map(_cpu, pool)), sum(map(_cpu, shippers)))
        exit_code = worker.stop()
    finally:
        worker.kill()
        producer.close()
    wait_delivered(receiver, tasks + WARMUP_TASKS, 30.0)
    per_1000 = [round((b - a) * 1000.0 * 1000.0 / tasks, 1) for a, b in zip(before, after,
                                                                            strict=True)]
    return {"placement": placement, "tasks": tasks, "work_ms": work_ms,
            "tasks_per_s": round(tasks / seconds, 2), "exit_code": exit_code,
            "main_cpu_ms_per_1000_tasks": per_1000[0],
            "pool_cpu_ms_per_1000_tasks": per_1000[1],
            "shipper_process_cpu_ms_per_1000_tasks": per_1000[2],
            "delivered_generations": generations(receiver),
            "expected_generations": tasks + WARMUP_TASKS}


def compare_placements(tasks: int, rounds: int, scratch: Path) -> list[dict[str, Any]]:
    """Thread in the main process vs process of its own, alternated round by round."""
    import uuid

    from bench._procs import RedisServer
    from bench.throughput import Harness
    from tracing.testing import LangfuseReceiver

    rows = []
    redis_server = RedisServer(scratch)
    try:
        key = uuid.uuid4().hex[:8]
        with LangfuseReceiver(public_key=f"pk-lf-{key}", secret_key=f"sk-lf-{key}") as receiver:
            harness = Harness(redis_server, receiver, scratch)
            for round_no in range(rounds):
                order = list(PLACEMENTS) if round_no % 2 == 0 else list(reversed(PLACEMENTS))
                for placement in order:
                    rows.append({"round": round_no,
                                 **placement_once(harness, placement, tasks, 5.0)})
    finally:
        redis_server.stop()
    return rows


if __name__ == "__main__":
    main()

"""The whole benchmark in one invocation: settings, the order of runs, the JSON lines.

Order: worker runs first (throughput rounds, implementations alternated and rotated round by
round so none always runs first or last; then delivery latency; then memory), then the
in-process costs, then the shipper from prepared spools (throughput rounds, then backlog).
Every measurement becomes one JSON line, written as soon as it exists.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import inprocess, latency, memory, shipping
from bench._machine import machine_info
from bench._procs import RedisServer
from bench._stats import median
from bench.throughput import IMPLEMENTATIONS, TRACED, Harness, RunSettings, run_once
from tracing.testing import LangfuseReceiver

SPANS_PER_TASK = 2  # the task observation and its generation
OUTAGE_SECONDS = 1800


@dataclass
class Settings:
    """Everything a run is parameterised by (the CLI's flags)."""

    tasks: int = 1000
    rounds: int = 3
    latency_ms: float = 50.0
    work_ms: float = 5.0
    impls: tuple[str, ...] = tuple(IMPLEMENTATIONS)
    latency_tasks: int = 500
    latency_rate: float = 100.0
    memory_first: int = 1000
    memory_tasks: int = 50000
    memory_baseline: bool = True
    overhead_iterations: int = 4000
    spool_spans: int = 100000
    ship_targets: tuple[str, ...] = shipping.TARGETS
    backlog_max_spans: int = 300000
    out: Path | None = None
    command: str = field(default_factory=lambda: shlex.join(["python", "-m", "bench",
                                                             *sys.argv[1:]]))

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        """A fast smoke run: small counts, one round."""
        values: dict[str, Any] = {
            "tasks": 200, "rounds": 1, "latency_tasks": 100, "memory_first": 200,
            "memory_tasks": 1500, "memory_baseline": False, "overhead_iterations": 1000,
            "spool_spans": 5000, "backlog_max_spans": 10000,
        }
        return cls(**{**values, **overrides})


class Recorder:
    """Collects records and appends each as a JSON line (with machine info) to ``out``."""

    def __init__(self, settings: Settings) -> None:
        self.records: list[dict[str, Any]] = []
        self.out = settings.out
        self.common = {"run_id": uuid.uuid4().hex[:12], "command": settings.command,
                       "machine": machine_info(),
                       "settings": {k: v for k, v in asdict(settings).items()
                                    if k not in ("out", "command")}}
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, bench: str, **fields: Any) -> dict[str, Any]:
        # The load average tells a reader whether something else shared the machine.
        record = {"bench": bench, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "load_avg_1m": round(os.getloadavg()[0], 2), **fields, **self.common}
        self.records.append(record)
        if self.out is not None:
            with self.out.open("a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        return record


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(settings: Settings) -> list[dict[str, Any]]:
    """Run every measurement; return the records (also written to ``settings.out``)."""
    recorder = Recorder(settings)
    with tempfile.TemporaryDirectory(prefix="celery-langfuse-bench-") as tmp:
        scratch = Path(tmp)
        traced_tps = _worker_runs(settings, recorder, scratch)
        _inprocess_runs(settings, recorder, scratch)
        _shipping_runs(settings, recorder, scratch, traced_tps)
    return recorder.records


def _worker_runs(settings: Settings, recorder: Recorder, scratch: Path) -> float | None:
    redis_server = RedisServer(scratch)
    key = uuid.uuid4().hex[:8]
    try:
        with LangfuseReceiver(public_key=f"pk-lf-{key}", secret_key=f"sk-lf-{key}") as receiver:
            harness = Harness(redis_server, receiver, scratch)
            traced_tps = _throughput(settings, recorder, harness)
            receiver.set_latency(0.0)
            _latency(settings, recorder, harness)
            _memory(settings, recorder, harness)
    finally:
        redis_server.stop()
    return traced_tps


def _throughput(settings: Settings, recorder: Recorder, harness: Harness) -> float | None:
    run_settings = RunSettings(settings.tasks, settings.work_ms, settings.latency_ms / 1000.0)
    rows: list[dict[str, Any]] = []
    impls = list(settings.impls)
    for round_no in range(settings.rounds):
        shift = round_no % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            _log(f"throughput round {round_no + 1}/{settings.rounds}: {impl}")
            row = run_once(harness, impl, run_settings, round_no)
            rows.append(recorder.emit("throughput_run", latency_ms=settings.latency_ms,
                                      work_ms=settings.work_ms, **row))
    summary = summarise_throughput(rows)
    for row in summary:
        recorder.emit("throughput", latency_ms=settings.latency_ms, work_ms=settings.work_ms,
                      **row)
    traced = [r for r in summary if r["impl"] == TRACED]
    return traced[0]["tasks_per_s"] if traced else None


def summarise_throughput(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per implementation: medians over rounds; the ratio is the median of per-round ratios."""
    baseline = {r["round"]: r["tasks_per_s"] for r in rows if r["impl"] == "untraced"}
    out = []
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        ratios = [r["tasks_per_s"] / baseline[r["round"]] for r in mine if r["round"] in baseline]
        delivered = [r.get("delivered_generations_after_drain", r["delivered_generations"])
                     for r in mine]
        out.append({
            "impl": impl, "rounds": len(mine),
            "tasks_per_s": round(median([r["tasks_per_s"] for r in mine]), 1),
            "tasks_per_s_each": [r["tasks_per_s"] for r in mine],
            "ratio_to_untraced": round(median(ratios), 3) if ratios else None,
            "expected_generations": mine[0]["expected_generations"],
            "delivered_generations_min": min(r["delivered_generations"] for r in mine),
            "delivered_generations_max": max(r["delivered_generations"] for r in mine),
            "delivered_after_drain_min": min(delivered),
            "duplicates_max": max(r["duplicates"] for r in mine),
            "shutdown_s_median": round(median([r["shutdown_s"] for r in mine]), 2),
            "cpu_ms_per_task_main": round(median([r["cpu_ms_per_task_main"] for r in mine]), 3),
            "cpu_ms_per_task_children": round(
                median([r["cpu_ms_per_task_children"] for r in mine]), 3),
        })
    return out


def _latency(settings: Settings, recorder: Recorder, harness: Harness) -> None:
    if settings.latency_tasks <= 0 or TRACED not in settings.impls:
        return
    _log(f"delivery latency: {settings.latency_tasks} tasks at {settings.latency_rate:g}/s")
    result = latency.measure(harness, settings.latency_tasks, settings.latency_rate,
                             settings.work_ms)
    recorder.emit("delivery_latency", **result)


def _memory(settings: Settings, recorder: Recorder, harness: Harness) -> None:
    if settings.memory_tasks <= settings.memory_first:
        return
    impls = [TRACED] + (["untraced"] if settings.memory_baseline else [])
    for impl in impls:
        _log(f"memory: {impl}, {settings.memory_tasks} tasks")
        result = memory.measure(harness, impl, settings.memory_first, settings.memory_tasks)
        recorder.emit("memory", **result)


def _inprocess_runs(settings: Settings, recorder: Recorder, scratch: Path) -> None:
    if settings.overhead_iterations <= 0:
        return
    _log("in-process: per-task overhead, spool append, force-flush")
    overhead = inprocess.task_overhead(scratch / "inproc-overhead", settings.overhead_iterations)
    recorder.emit("task_overhead", **overhead)
    costs = inprocess.spool_costs(scratch / "inproc-spool", settings.overhead_iterations)
    recorder.emit("spool_costs", **costs)


def _shipping_runs(settings: Settings, recorder: Recorder, scratch: Path,
                   traced_tps: float | None) -> None:
    if settings.spool_spans <= 0:
        return
    _log(f"shipper: preparing a spool of {settings.spool_spans} spans")
    prepared, info = shipping.prepared_spool(scratch, settings.spool_spans)
    recorder.emit("spool_prepared", **info)
    rows = []
    for round_no in range(settings.rounds):
        for target in settings.ship_targets:
            _log(f"shipper round {round_no + 1}/{settings.rounds}: {target}")
            row = shipping.ship_prepared(prepared, scratch, target)
            rows.append(recorder.emit("shipper_run", round=round_no, **row))
    for target in settings.ship_targets:
        mine = [r for r in rows if r["target"] == target]
        recorder.emit("shipper", target=target, spans=settings.spool_spans, rounds=len(mine),
                      spans_per_s=round(median([r["spans_per_s"] for r in mine]), 1),
                      received_min=min(r.get("received_spans", r["shipped_spans"])
                                       for r in mine))
    _remove(prepared)
    _backlog(settings, recorder, scratch, traced_tps)


def _backlog(settings: Settings, recorder: Recorder, scratch: Path,
             traced_tps: float | None) -> None:
    if traced_tps is None or settings.backlog_max_spans <= 0:
        return
    outage_spans = round(traced_tps * SPANS_PER_TASK * OUTAGE_SECONDS)
    used = min(outage_spans, settings.backlog_max_spans)
    _log(f"backlog: {outage_spans} spans for a 30-min outage; shipping {used}")
    prepared, info = shipping.prepared_spool(scratch, used)
    for target in [t for t in ("receiver", "sink") if t in settings.ship_targets]:
        row = shipping.ship_prepared(prepared, scratch, target)
        seconds_full = row["seconds"] * outage_spans / used if used else None
        recorder.emit("backlog", traced_tasks_per_s=traced_tps, outage_s=OUTAGE_SECONDS,
                      outage_spans=outage_spans, spans_used=used, spool_bytes=info["bytes"],
                      extrapolated_s=round(seconds_full, 1) if seconds_full else None, **row)
    _remove(prepared)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)



"""The task path of an earlier commit and of this tree, side by side, rounds alternated.

``python -m bench.taskpath --before COMMIT --rounds 4 --out bench/results.jsonl``

Both sides run the same benchmark code and apps (this tree's ``bench/`` and ``harness/``);
only ``tracing/`` differs: the ``before`` snapshot is this tree with ``tracing/`` taken from
COMMIT (``git archive``), so edits made during a run change nothing.

* **In-process** (``inproc_run``): a fresh interpreter per side and round runs
  ``bench.inprocess.task_overhead`` — ``Task.apply()`` of a trivial task with the handlers
  connected vs disconnected, in alternating blocks — and the same for a task making one SDK
  generation (``generation``: the difference then also holds the generation's export).
* **Worker runs** (``worker_run``): a real prefork worker (``-c 2``) per implementation and
  round on a private Redis, tasks of ``--work-ms`` against the loopback receiver answering
  after ``--latency-ms``; tasks/s and CPU per task by process role — the worker's main
  process, its pool children, the shipping process — from /proc, over the measured tasks
  only (after a warm-up whose spans were delivered). Implementations: the generation task
  untraced, with the SDK alone (``@observe`` + flush at child shutdown), and traced by each
  side; the plain task (no generation) untraced and traced by each side. Their order
  rotates round by round.

Each row is one JSON line with the command that made it; ``summary`` rows give min / median /
max over rounds. The machine is shared: read ``load_avg_1m`` next to every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench._procs import ROOT, RedisServer, Worker, children_of
from bench._rows import emit_row
from bench._stats import median
from bench.throughput import WARMUP_TASKS, Harness, cpu_seconds, run_tasks
from tracing.testing import LangfuseReceiver

GEN = "bench.apps.instrumented"
PLAIN = "bench.apps.plain"
# implementation -> (app module, side whose tracing/ it runs, extra environment)
IMPLS: dict[str, tuple[str, str, dict[str, str]]] = {
    "untraced": ("bench.apps.untraced", "after", {}),
    "sdk_alone": ("bench.apps.observe_shutdown_flush", "after", {}),
    "before": (GEN, "before", {}),
    "after": (GEN, "after", {}),
    "plain_untraced": (PLAIN, "after", {}),
    "plain_before": (PLAIN, "before", {"CELERY_LANGFUSE_BENCH_TRACED": "1"}),
    "plain_after": (PLAIN, "after", {"CELERY_LANGFUSE_BENCH_TRACED": "1"}),
}
SPANS_PER_TASK = {"before": 2, "after": 2, "sdk_alone": 2, "plain_before": 1, "plain_after": 1}


def snapshot(before: str, into: Path) -> dict[str, Path]:
    """Two trees: HEAD as committed, and HEAD with ``tracing/`` from ``before``."""
    roots = {"after": into / "after", "before": into / "before"}
    for label, root in roots.items():
        root.mkdir(parents=True)
        _untar(["HEAD", "tracing", "bench", "harness"], root)
        if label == "before":
            shutil.rmtree(root / "tracing")
            _untar([before, "tracing"], root)
    return roots


def _untar(spec: list[str], into: Path) -> None:
    archive = subprocess.run(["git", "archive", *spec], cwd=ROOT, capture_output=True,
                             check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=120)


def rev(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, text=True,
                          capture_output=True, check=True, timeout=60).stdout.strip()


_INPROC = """
import json, sys, tempfile, tracing
from pathlib import Path
from bench.inprocess import task_overhead, generation_overhead
with tempfile.TemporaryDirectory() as tmp:
    plain = task_overhead(Path(tmp) / "plain", int(sys.argv[1]))
    gen = generation_overhead(Path(tmp) / "gen", int(sys.argv[1]))
print(json.dumps({"tracing": tracing.__file__, "plain": plain, "generation": gen}))
"""


def inproc_once(root: Path, iterations: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _INPROC, str(iterations)], cwd=root,
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if done.returncode != 0:
        raise RuntimeError(f"{root}: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not result.pop("tracing").startswith(str(root)):
        raise RuntimeError(f"{root}: imported another tree's tracing")
    return result


def _shipper_pids(main_pid: int) -> list[int]:
    found = []
    for pid in children_of(main_pid):
        try:
            if b"_shipper_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _cpu_by_role(main: int) -> tuple[float, float, float]:
    shippers = _shipper_pids(main)
    pool = [pid for pid in children_of(main) if pid not in shippers]
    return (cpu_seconds(main), sum(map(cpu_seconds, pool)), sum(map(cpu_seconds, shippers)))


def _delivered(receiver: LangfuseReceiver) -> int:
    return len({o.id for o in receiver.observations})


def _wait_spans(receiver: LangfuseReceiver, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _delivered(receiver) >= expected:
            break
        time.sleep(0.05)
    return _delivered(receiver)


def worker_once(harness: Harness, roots: dict[str, Path], impl: str, tasks: int,
                work_ms: float, latency_s: float) -> dict[str, Any]:
    """One implementation, one round; CPU by role over the measured tasks only."""
    app, side, extra = IMPLS[impl]
    receiver = harness.receiver
    receiver.reset_faults()
    receiver.clear()
    receiver.set_latency(latency_s)
    queue = f"tp-{impl}-{uuid.uuid4().hex[:6]}"
    env = {**harness.worker_env(queue, harness.scratch / queue), **extra,
           "PYTHONPATH": str(roots[side])}
    worker = Worker(app, env, cwd=roots[side])
    spans = SPANS_PER_TASK.get(impl, 0)
    producer = harness.producer()
    try:
        worker.wait_ready()
        run_tasks(producer, queue, range(-WARMUP_TASKS, 0), work_ms)
        if spans:  # the shipper (and the SDK's export thread) are running
            _wait_spans(receiver, WARMUP_TASKS * spans, 60.0)
        before = _cpu_by_role(worker.proc.pid)
        seconds = run_tasks(producer, queue, range(tasks), work_ms)
        after = _cpu_by_role(worker.proc.pid)
        worker.stop()
    finally:
        worker.kill()
        producer.close()
    delivered = _wait_spans(receiver, (tasks + WARMUP_TASKS) * spans, 30.0) if spans else 0
    main_us, pool_us, ship_us = ((b - a) * 1e6 / tasks for a, b in zip(before, after,
                                                                       strict=True))
    return {"impl": impl, "side": side, "tasks": tasks, "work_ms": work_ms,
            "latency_ms": latency_s * 1000, "tasks_per_s": round(tasks / seconds, 2),
            "cpu_us_per_task_main": round(main_us, 1), "cpu_us_per_task_pool": round(pool_us, 1),
            "cpu_us_per_task_shipper": round(ship_us, 1),
            "shipper_cpu_us_per_span": round(ship_us / spans, 1) if spans else None,
            "expected_spans": (tasks + WARMUP_TASKS) * spans, "delivered_spans": delivered,
            "duplicates": len(receiver.duplicates())}


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(median(values), 2),
            "max": round(max(values), 2)}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """min / median / max over rounds, per implementation (worker) and side (in-process)."""
    out: list[dict[str, Any]] = []
    workers = [r for r in rows if r["bench"] == "taskpath_worker_run"]
    for impl in dict.fromkeys(r["impl"] for r in workers):
        mine = [r for r in workers if r["impl"] == impl]
        out.append({"bench": "taskpath_worker", "impl": impl, "rounds": len(mine), **{
            key: spread([r[key] for r in mine if r[key] is not None])
            for key in ("tasks_per_s", "cpu_us_per_task_main", "cpu_us_per_task_pool",
                        "cpu_us_per_task_shipper", "shipper_cpu_us_per_span")
            if any(r[key] is not None for r in mine)},
            "delivered_min": min(r["delivered_spans"] - r["expected_spans"] for r in mine),
            "duplicates_max": max(r["duplicates"] for r in mine)})
    inproc = [r for r in rows if r["bench"] == "taskpath_inproc_run"]
    for side in dict.fromkeys(r["side"] for r in inproc):
        mine = [r for r in inproc if r["side"] == side]
        out.append({"bench": "taskpath_inproc", "side": side, "rounds": len(mine), **{
            f"{kind}_overhead_median_us": spread([r[kind]["overhead_median_us"] for r in mine])
            for kind in ("plain", "generation")}})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.taskpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="commit whose tracing/ to compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per worker run")
    parser.add_argument("--inproc-iterations", type=int, default=2000)
    parser.add_argument("--work-ms", type=float, default=5.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)} ('' for none)")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown implementation(s) {sorted(unknown)}")
    common = {"command": "python -m bench.taskpath " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
              "commits": {"before": rev(args.before), "after": rev("HEAD")},
              "python": platform.python_version(), "cpus": os.cpu_count()}
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        line = {**row, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "load_avg_1m": round(os.getloadavg()[0], 2), **common}
        emit_row(line, args.out, rows)

    with tempfile.TemporaryDirectory(prefix="bench-taskpath-") as tmp:
        scratch = Path(tmp)
        roots = snapshot(args.before, scratch / "trees")
        for round_no in range(args.rounds if args.inproc_iterations > 0 else 0):
            for side in (["before", "after"] if round_no % 2 == 0 else ["after", "before"]):
                result = inproc_once(roots[side], args.inproc_iterations)
                emit({"bench": "taskpath_inproc_run", "side": side, "round": round_no,
                      **result})
        if impls:
            _worker_rounds(args, impls, roots, scratch, emit)
        for row in summarise(rows):
            emit(row)


def _worker_rounds(args: argparse.Namespace, impls: list[str], roots: dict[str, Path],
                   scratch: Path, emit: Any) -> None:
    redis_server = RedisServer(scratch)
    key = uuid.uuid4().hex[:8]
    try:
        with LangfuseReceiver(public_key=f"pk-lf-{key}", secret_key=f"sk-lf-{key}") as receiver:
            harness = Harness(redis_server, receiver, scratch)
            for round_no in range(args.rounds):
                shift = round_no % len(impls)
                for impl in impls[shift:] + impls[:shift]:
                    row = worker_once(harness, roots, impl, args.tasks, args.work_ms,
                                      args.latency_ms / 1000.0)
                    emit({"bench": "taskpath_worker_run", "round": round_no, **row})
    finally:
        redis_server.stop()


if __name__ == "__main__":
    main()

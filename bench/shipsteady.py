"""The shipping process at steady state: CPU per span while tasks trickle in, two trees side by
side.

``python -m bench.shipsteady --before COMMIT --rate 300 --seconds 8 --rounds 2 --out F``

Two writer processes (like a prefork pool of two children) append what a traced task leaves
on the spool, at ``--rate`` tasks per second between them: the task's open-attempt record,
then its generation's span (unless ``--plain``), then the task's span, each in an append of
its own, from real SDK spans (``bench.shipping._templates``) cloned with fresh ids. A shipper
reads the spool the way the worker's shipping process does (``Shipper`` with its status
written every 0.5 s) and sends to the minimal OTLP sink (``bench._sink``) in a process of
its own; its CPU (the whole interpreter, ``time.process_time``) is taken over ``--seconds``
after a warm-up, divided by the spans it shipped in that window.

Both trees run this tree's ``bench/``; only ``tracing/`` differs (``bench.taskpath.snapshot``),
and the writers always run this tree's (the spool record format is the same). ``--profile
DIR`` writes a cProfile of each shipper thread (``{side}-{round}.prof``).

This isolates the shipper from Celery (no broker, no pool): for the figure with a real
worker, see ``bench.taskpath`` (``shipper_cpu_us_per_span``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._procs import ROOT, ReceiverProcess
from bench._rows import emit_row
from bench._stats import median

KEYS = ("pk-lf-steady", "sk-lf-steady")


# --------------------------------------------------------------------------- writer


def write_tasks(spool: Path, rate: float, seconds: float, plain: bool, seed: int) -> int:
    """Append a traced task's records at ``rate`` tasks/s for ``seconds``; tasks written."""
    from bench.shipping import _clone, _templates
    from tracing.spool import SegmentWriter
    from tracing.spool._attempts import open_frame
    from tracing.spool._exporter import span_frame

    task, generation = _templates()
    rng = random.Random(seed)
    writer = SegmentWriter(spool)
    started = time.monotonic()
    done = 0
    while True:
        due = started + done / rate
        now = time.monotonic()
        if now - started >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        trace_id, task_id = rng.getrandbits(128) or 1, rng.getrandbits(64) or 1
        task_span = _clone(task, trace_id, task_id, None)
        writer.append(open_frame(f"task-{seed}-{done}", task_span))
        if not plain:
            writer.append(span_frame(_clone(generation, trace_id, rng.getrandbits(64) or 1,
                                            task_id)))
        writer.append(span_frame(task_span))
        done += 1
    writer.close()
    return done


# --------------------------------------------------------------------------- shipper


def ship(spool: Path, base_url: str, warmup: float, seconds: float,
         profile: Path | None) -> dict[str, Any]:
    """Run a shipper like the shipping process's; its CPU and spans over ``seconds``."""
    import cProfile

    from tracing import load_config
    from tracing.shipping._shipper import Shipper
    from tracing.spool import SegmentWriter
    from tracing.spool._exporter import SpoolExporter

    config = load_config(public_key=KEYS[0], secret_key=KEYS[1], base_url=base_url,
                         spool_dir=str(spool))
    shipper = Shipper(config, SpoolExporter(SegmentWriter(spool)), status_interval=0.5)
    profiler = cProfile.Profile(time.thread_time) if profile else None  # CPU, not waits
    if profiler is not None:
        run = shipper._run

        def profiled() -> None:
            profiler.runcall(run)

        shipper._run = profiled  # type: ignore[method-assign]
    shipper.start()
    time.sleep(warmup)
    spans0, requests0, cpu0 = (shipper.stats.shipped_spans, shipper.stats.requests,
                               time.process_time())
    time.sleep(seconds)
    spans1, requests1, cpu1 = (shipper.stats.shipped_spans, shipper.stats.requests,
                               time.process_time())
    shipper.stop(10.0)
    if profiler is not None and profile is not None:
        profiler.dump_stats(str(profile))
    spans = spans1 - spans0
    return {"spans": spans, "requests": requests1 - requests0,
            "cpu_s": round(cpu1 - cpu0, 4),
            "cpu_us_per_span": round((cpu1 - cpu0) * 1e6 / spans, 1) if spans else None,
            "shipped_total": shipper.stats.shipped_spans}


# --------------------------------------------------------------------------- one run


def steady_once(root: Path, spool: Path, base_url: str, rate: float, seconds: float,
                plain: bool, profile: Path | None, warmup: float = 2.0) -> dict[str, Any]:
    """Writers (this tree) and a shipper (``root``'s tracing) on a fresh spool."""
    spool.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    shipper_args = [sys.executable, "-m", "bench.shipsteady", "--ship", str(spool), base_url,
                    str(warmup), str(seconds)] + (["--profile", str(profile)] if profile else [])
    shipper = subprocess.Popen(shipper_args, cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    writers = [subprocess.Popen(
        [sys.executable, "-m", "bench.shipsteady", "--write", str(spool), str(rate / 2),
         str(warmup + seconds + 1.0), str(seed)] + (["--plain"] if plain else []),
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        text=True) for seed in (1, 2)]
    written = sum(int(w.communicate(timeout=300)[0].strip() or 0) for w in writers)
    out, err = shipper.communicate(timeout=300)
    if shipper.returncode != 0:
        raise RuntimeError(f"shipper failed: {err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["tasks_written"] = written
    result["spans_written"] = written * (1 if plain else 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shipsteady", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs=4, metavar=("SPOOL", "RATE", "SECONDS", "SEED"))
    parser.add_argument("--ship", nargs=4, metavar=("SPOOL", "URL", "WARMUP", "SECONDS"))
    parser.add_argument("--before", help="commit whose tracing/ to compare with this tree's")
    parser.add_argument("--rate", type=float, default=300.0, help="tasks/s, both writers")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="no generation: 1 span per task")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args()
    if args.write:
        spool, rate, seconds, seed = args.write
        print(write_tasks(Path(spool), float(rate), float(seconds), args.plain, int(seed)))
        return
    if args.ship:
        spool, url, warmup, seconds = args.ship
        print(json.dumps(ship(Path(spool), url, float(warmup), float(seconds), args.profile)))
        return
    if not args.before:
        parser.error("give --before COMMIT")
    compare(args)


def compare(args: argparse.Namespace) -> None:
    from bench.taskpath import rev, snapshot

    command = "python -m bench.shipsteady " + " ".join(sys.argv[1:])
    commits = {"before": rev(args.before), "after": rev("HEAD")}
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        line = {"bench": "shipper_steady", **row, "rate_tasks_s": args.rate,
                "spans_per_task": 1 if args.plain else 2, "commits": commits,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "load_avg_1m": round(os.getloadavg()[0], 2), "command": command,
                "python": platform.python_version()}
        emit_row(line, args.out, rows)

    with tempfile.TemporaryDirectory(prefix="bench-steady-") as tmp:
        scratch = Path(tmp)
        roots = snapshot(args.before, scratch / "trees")
        sink = ReceiverProcess(*KEYS, module="bench._sink")
        try:
            for round_no in range(args.rounds):
                for side in (["before", "after"] if round_no % 2 == 0 else ["after", "before"]):
                    profile = (args.profile / f"{side}-{round_no}.prof" if args.profile
                               else None)
                    result = steady_once(roots[side], scratch / f"spool-{side}-{round_no}",
                                         sink.base_url, args.rate, args.seconds, args.plain,
                                         profile)
                    emit({"side": side, "round": round_no, **result})
            stats = sink.sink_stats()
        finally:
            sink.stop()
        for side in ("before", "after"):
            values = [r["cpu_us_per_span"] for r in rows if r.get("side") == side
                      and r["cpu_us_per_span"] is not None]
            if values:
                emit({"side": side, "summary": True, "cpu_us_per_span": {
                    "min": min(values), "median": round(median(values), 1),
                    "max": max(values)}})
        emit({"side": "sink", "sink": stats})


if __name__ == "__main__":
    main()

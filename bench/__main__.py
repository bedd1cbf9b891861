"""``python -m bench``: run the benchmark, write JSON lines, print a Markdown summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.report import markdown
from bench.runner import Settings, run
from bench.throughput import IMPLEMENTATIONS


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    parser.add_argument("--quick", action="store_true",
                        help="fast smoke run (200 tasks, 1 round, small spool)")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 3)")
    parser.add_argument("--tasks", type=int, help="tasks per throughput run (default 1000)")
    parser.add_argument("--latency-ms", type=float, help="receiver latency (default 50)")
    parser.add_argument("--work-ms", type=float, help="each task's wait (default 5)")
    parser.add_argument("--impls", help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}")
    parser.add_argument("--spool-spans", type=int, help="spans in the shipper's spool (100000)")
    parser.add_argument("--memory-tasks", type=int, help="tasks for the memory run (50000)")
    parser.add_argument("--latency-tasks", type=int, help="tasks for delivery latency (500)")
    parser.add_argument("--backlog-max-spans", type=int,
                        help="cap on the 30-minute backlog's spans (300000)")
    args = parser.parse_args(argv)
    overrides = {
        name: value for name, value in {
            "out": args.out, "rounds": args.rounds, "tasks": args.tasks,
            "latency_ms": args.latency_ms, "work_ms": args.work_ms,
            "spool_spans": args.spool_spans, "memory_tasks": args.memory_tasks,
            "latency_tasks": args.latency_tasks, "backlog_max_spans": args.backlog_max_spans,
            "impls": tuple(args.impls.split(",")) if args.impls else None,
        }.items() if value is not None
    }
    unknown = set(overrides.get("impls", ())) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementation(s) {sorted(unknown)}")
    return Settings.quick(**overrides) if args.quick else Settings(**overrides)


def main(argv: list[str] | None = None) -> None:
    settings = parse(argv)
    records = run(settings)
    print(markdown(records))
    if settings.out is not None:
        print(f"\nJSON lines: {settings.out}")


if __name__ == "__main__":
    main()

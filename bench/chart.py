"""``python -m bench.chart``: the task-path chart (PNG) from ``bench/results.jsonl``.

Reads the rows of the newest ``python -m bench.taskpath`` run with worker rows in the
results file (rows sharing its ``command`` and commits, written within the hour before its
last worker row) and draws, per implementation, tasks/s (median of the rounds, bars from min to max)
and CPU µs per task by process role (pool children, the worker's main process, the shipping
process; medians, stacked). Needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench._stats import median

RESULTS = Path(__file__).with_name("results.jsonl")
ROLES = (("cpu_us_per_task_pool", "pool children"), ("cpu_us_per_task_main", "main process"),
         ("cpu_us_per_task_shipper", "shipping process"))
LABELS = {"untraced": "untraced", "sdk_alone": "SDK alone\n(+flush at exit)",
          "before": "celery-langfuse\nbefore", "after": "celery-langfuse\nafter",
          "plain_untraced": "no generation\nuntraced", "plain_before": "no generation\nbefore",
          "plain_after": "no generation\nafter"}


def latest_run(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The worker and in-process rows of the newest task-path run."""
    rows = [json.loads(line) for line in lines
            if '"taskpath_worker_run"' in line or '"taskpath_inproc_run"' in line]
    if not any(r["bench"] == "taskpath_worker_run" for r in rows):
        raise SystemExit("no taskpath_worker_run rows: run python -m bench.taskpath first")
    last = [r for r in rows if r["bench"] == "taskpath_worker_run"][-1]
    until = datetime.strptime(last["at"], "%Y-%m-%dT%H:%M:%S%z")
    return [r for r in rows if r["command"] == last["command"] and r["commits"] ==
            last["commits"] and until - datetime.strptime(r["at"], "%Y-%m-%dT%H:%M:%S%z")
            <= timedelta(hours=1)]


def draw(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inproc = [r for r in rows if r["bench"] == "taskpath_inproc_run"]
    rows = [r for r in rows if r["bench"] == "taskpath_worker_run"]
    impls = [i for i in LABELS if any(r["impl"] == i for r in rows)]
    by = {i: [r for r in rows if r["impl"] == i] for i in impls}
    tps = [[r["tasks_per_s"] for r in by[i]] for i in impls]
    mid = [median(v) for v in tps]
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(16, 5.6),
                                             gridspec_kw={"width_ratios": [3, 3, 2]})
    x = range(len(impls))
    left.bar(x, mid, color=["#999" if "untraced" in i else "#4a7ab5" for i in impls],
             yerr=[[m - min(v) for m, v in zip(mid, tps, strict=True)],
                   [max(v) - m for m, v in zip(mid, tps, strict=True)]], capsize=4)
    left.set_xticks(list(x), [LABELS[i] for i in impls], fontsize=7, rotation=35, ha="right")
    left.set_ylabel("tasks/s (median of rounds; bars: min-max)")
    left.set_title("Throughput, prefork -c 2")
    bottom = [0.0] * len(impls)
    for key, name in ROLES:
        values = [median([r[key] for r in by[i]]) for i in impls]
        right.bar(x, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xticks(list(x), [LABELS[i] for i in impls], fontsize=7, rotation=35, ha="right")
    right.set_ylabel("CPU µs per task (medians)")
    right.set_title("CPU per task by process role")
    right.legend(fontsize=8)
    _inproc_panel(third, inproc)
    first = rows[0]
    fig.suptitle(f"{first['tasks']} tasks of {first['work_ms']:g} ms per run, receiver "
                 f"{first['latency_ms']:g} ms, {len(by[impls[0]])} alternated rounds; "
                 f"before {first['commits']['before']}, after {first['commits']['after']}; "
                 f"shared 2-core machine (load {median([r['load_avg_1m'] for r in rows]):.1f})",
                 fontsize=9)
    fig.text(0.01, 0.01, first["command"], fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _inproc_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Our cost per task in one process (handlers on minus off), before vs after."""
    groups = [(side, kind) for kind in ("plain", "generation") for side in ("before", "after")]
    values = [[r[kind]["overhead_median_us"] for r in rows if r["side"] == side]
              for side, kind in groups]
    shown = [(g, v) for g, v in zip(groups, values, strict=True) if v]
    if not shown:
        axis.set_axis_off()
        return
    mid = [median(v) for _, v in shown]
    axis.bar(range(len(shown)), mid,
             color=["#c77" if side == "before" else "#4a7ab5" for (side, _), _ in shown],
             yerr=[[m - min(v) for m, (_, v) in zip(mid, shown, strict=True)],
                   [max(v) - m for m, (_, v) in zip(mid, shown, strict=True)]], capsize=4)
    axis.set_xticks(range(len(shown)), [f"{kind}\n{side}" for (side, kind), _ in shown],
                    fontsize=7)
    axis.axhline(100, color="#999", linestyle="--", linewidth=1)
    axis.set_ylabel("µs per task (median of per-round medians; bars: min-max)")
    axis.set_title("In-process: tracing's cost per task")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path,
                        default=RESULTS.parent.parent / "docs" / "benchmarks-taskpath.png")
    args = parser.parse_args(argv)
    print(draw(latest_run(args.results.read_text().splitlines()), args.out))


if __name__ == "__main__":
    main()

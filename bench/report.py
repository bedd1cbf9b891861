"""The short Markdown summary printed at the end (pasted into the README by hand)."""

from __future__ import annotations

from typing import Any

TARGET_RATIO = 0.95
TARGET_OVERHEAD_US = 300.0
TARGET_SHIPPER = 20000.0
TARGET_P99_MS = 2000.0
TARGET_RSS_MIB = 10.0

_LABELS = {
    "untraced": "untraced (no Langfuse)",
    "observe": "`@observe` alone",
    "observe+shutdown_flush": "`@observe` + flush in `worker_process_shutdown`",
    "observe+flush_per_task": "`@observe` + `flush()` after every task",
    "celery-langfuse": "celery-langfuse `instrument(app)` (spool)",
}


def _first(records: list[dict[str, Any]], bench: str, **match: Any) -> dict[str, Any] | None:
    for record in records:
        if record["bench"] == bench and all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _receiver_note(record: dict[str, Any]) -> str:
    return " (`tracing.testing` receiver)"


def throughput_table(records: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in records if r["bench"] == "throughput"]
    if not rows:
        return []
    first = rows[0]
    lines = [
        f"Throughput: {first['settings']['tasks']} tasks of {first['work_ms']:g} ms "
        f"(`time.sleep`) + 1 generation, prefork `-c 2`, receiver latency "
        f"{first['latency_ms']:g} ms{_receiver_note(first)}; median of {first['rounds']} "
        "rounds.",
        "",
        "| implementation | tasks/s | x untraced | generations delivered | child CPU ms/task |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        expected = r["expected_generations"]
        delivered = (f"{r['delivered_generations_min']}/{expected}" if expected else "—")
        if r["impl"] == "celery-langfuse" and r["delivered_after_drain_min"] != \
                r["delivered_generations_min"]:
            delivered += f" ({r['delivered_after_drain_min']} after a drain)"
        ratio = "1.00" if r["impl"] == "untraced" else f"{r['ratio_to_untraced']:.2f}"
        lines.append(f"| {_LABELS.get(r['impl'], r['impl'])} | {r['tasks_per_s']:.0f} | "
                     f"{ratio} | {delivered} | {r['cpu_ms_per_task_children']:.2f} |")
    return lines


def targets_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| measurement | measured | target | met |", "|---|---:|---:|---|"]
    traced = _first(records, "throughput", impl="celery-langfuse")
    if traced is not None and traced["ratio_to_untraced"] is not None:
        complete = traced["delivered_after_drain_min"] >= traced["expected_generations"]
        lines.append(
            f"| traced throughput / untraced (100% delivered: {'yes' if complete else 'no'}) "
            f"| {traced['ratio_to_untraced']:.2f}x | ≥ {TARGET_RATIO}x | "
            f"{_met(traced['ratio_to_untraced'] >= TARGET_RATIO and complete)} |")
    overhead = _first(records, "task_overhead")
    if overhead is not None:
        lines.append(
            f"| `instrument()` overhead per task, median (p99) | "
            f"{overhead['overhead_median_us']:.0f} µs ({overhead['overhead_p99_us']:.0f} µs) | "
            f"≤ {TARGET_OVERHEAD_US:.0f} µs | "
            f"{_met(overhead['overhead_median_us'] <= TARGET_OVERHEAD_US)} |")
    lines += _spool_lines(records)
    lines += _shipper_lines(records)
    lat = _first(records, "delivery_latency")
    if lat is not None:
        lines.append(
            f"| task end → received, p50 / p99 ({lat['rate_per_s']:g} tasks/s) | "
            f"{lat['p50_ms']:.0f} / {lat['p99_ms']:.0f} ms | p99 < {TARGET_P99_MS:.0f} ms | "
            f"{_met(lat['p99_ms'] < TARGET_P99_MS and lat['received'] == lat['tasks'])} |")
    lines += _memory_lines(records)
    lines += _backlog_lines(records)
    return lines


def _spool_lines(records: list[dict[str, Any]]) -> list[str]:
    costs = _first(records, "spool_costs")
    if costs is None:
        return []
    append, flush = costs["append_per_span"], costs["force_flush_2_spans"]
    return [
        f"| spool append per span (encode + frame + write), median (p99) | "
        f"{append['median_us']:.0f} µs ({append['p99_us']:.0f} µs) | — | — |",
        f"| task-end force-flush (2 spans), median (p99) | "
        f"{flush['median_us']:.0f} µs ({flush['p99_us']:.0f} µs) | — | — |",
    ]


def _shipper_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    names = {"receiver": "`tracing.testing` receiver", "sink": "minimal OTLP sink",
             "discard": "gzip + discard (shipper alone)"}
    for target in ("receiver", "sink", "discard"):
        r = _first(records, "shipper", target=target)
        if r is None:
            continue
        target_cell = f"≥ {TARGET_SHIPPER:,.0f}/s" if target == "receiver" else "—"
        met = _met(r["spans_per_s"] >= TARGET_SHIPPER) if target == "receiver" else "—"
        lines.append(f"| shipper, {r['spans']:,} spans → {names[target]} | "
                     f"{r['spans_per_s']:,.0f} spans/s | {target_cell} | {met} |")
    return lines


def _memory_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in (x for x in records if x["bench"] == "memory"):
        traced = r["impl"] == "celery-langfuse"
        lines.append(
            f"| RSS growth {r['first_tasks']:,} → {r['total_tasks']:,} tasks, main + children "
            f"({r['impl']}) | {r['growth_total_mib']:+.1f} MiB | "
            f"{f'< {TARGET_RSS_MIB:.0f} MB' if traced else '—'} | "
            f"{_met(r['growth_total_mib'] < TARGET_RSS_MIB) if traced else '—'} |")
    return lines


def _backlog_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in (x for x in records if x["bench"] == "backlog"):
        scaled = "" if r["spans_used"] == r["outage_spans"] else \
            f"; all {r['outage_spans']:,}: ≈ {r['extrapolated_s']:.0f} s (linear)"
        lines.append(
            f"| backlog of a 30-min outage → {r['target']}: {r['spans_used']:,} spans{scaled} "
            f"| {r['seconds']:.2f} s | — | — |")
    return lines


def markdown(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    common = records[0]
    machine = common["machine"]
    header = (f"`{common['command']}` on {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
              f"Python {machine['python']}, {machine['platform']}, celery {machine['celery']}, "
              f"langfuse {machine['langfuse']}")
    return "\n".join([header, "", *throughput_table(records), "", *targets_table(records)])

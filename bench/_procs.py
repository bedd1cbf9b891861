"""Real processes the benchmark drives: a private redis-server, celery workers, a receiver.

They come from the repository's one process harness (``harness``, shared with the tests and
``make demo``; the benchmarks never import ``tests``): every process starts in its own session
on a free loopback port, is waited on by what it prints or answers, and is killed (its whole
process group) when the benchmark is done with it. Only the memory readings are the
benchmark's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import ROOT, HarnessError, RedisServer, WorkerProcess
from harness import ReceiverProcess as _Receiver

__all__ = ["ROOT", "ReceiverProcess", "RedisServer", "Worker"]


class Worker(WorkerProcess):
    """A prefork worker on the benchmark's queue (``BENCH_QUEUE``), with memory readings."""

    def __init__(self, app: str, env: Mapping[str, str], *, concurrency: int = 2,
                 extra: tuple[str, ...] = (), cwd: Path = ROOT) -> None:
        super().__init__(app, {**env, "PYTHONUNBUFFERED": "1"}, concurrency=concurrency,
                         queue=env["BENCH_QUEUE"], extra=extra, cwd=cwd)

    def tail(self, n: int = 40) -> str:
        return self.output_tail(n)

    def rss_kib(self) -> dict[str, int]:
        """VmRSS of the main process and each pool child, in KiB."""
        result = {"main": vm_rss_kib(self.proc.pid)}
        for n, pid in enumerate(sorted(children_of(self.proc.pid))):
            result[f"child{n}"] = vm_rss_kib(pid)
        return result

    def stop(self, timeout: float = 60.0) -> int | None:  # type: ignore[override]
        """Warm shutdown (SIGTERM); None if it had to be SIGKILLed after ``timeout``."""
        try:
            return super().stop(timeout)
        except HarnessError:
            return None

    def kill(self) -> None:
        self.kill_group()


class ReceiverProcess(_Receiver):
    """The receiver (or ``bench._sink``) in its own process (own GIL), with the counters the
    benchmark reads."""

    def sink_stats(self) -> dict[str, int]:
        return dict(self.get_json("/_sink/stats"))

    def accepted_span_ids(self) -> list[str]:
        """Span ids of every request answered 200 (duplicates included)."""
        requests: list[dict[str, Any]] = self.get_json("/_receiver/requests")
        return [span_id for r in requests if r["status"] == 200 for span_id in r["span_ids"]]


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

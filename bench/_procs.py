"""Real processes the benchmark drives: a private redis-server, celery workers, a receiver.

The Redis server and worker processes are the test suite's (``tests/support.py``): every
process starts in its own session on a free loopback port, is waited on by what it prints or
answers, and is killed (its whole process group) when the benchmark is done with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support import ROOT, RedisServer, WorkerProcess, free_port

__all__ = ["ROOT", "ReceiverProcess", "RedisServer", "Worker"]

class Worker(WorkerProcess):
    """A prefork worker on the benchmark's queue (``BENCH_QUEUE``), with memory readings."""

    def __init__(self, app: str, env: Mapping[str, str], *, concurrency: int = 2,
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__(app, {**env, "PYTHONUNBUFFERED": "1"}, concurrency=concurrency,
                         queue=env["BENCH_QUEUE"], extra=extra)

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
        except AssertionError:
            return None

    def kill(self) -> None:
        self.kill_group()


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


class ReceiverProcess:
    """``python -m tracing.testing`` (or ``bench._sink``) in its own process: own GIL."""

    def __init__(self, public_key: str, secret_key: str, module: str = "tracing.testing") -> None:
        self.port = free_port()
        self.public_key, self.secret_key = public_key, secret_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(self.port),
             "--public-key", public_key, "--secret-key", secret_key],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.stop()
            raise RuntimeError(f"receiver did not start: {line!r}")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=120) as response:
            return json.loads(response.read())

    def sink_stats(self) -> dict[str, int]:
        return dict(self._get("/_sink/stats"))

    def accepted_span_ids(self) -> list[str]:
        """Span ids of every request answered 200 (duplicates included)."""
        return [span_id for r in self._get("/_receiver/requests") if r["status"] == 200
                for span_id in r["span_ids"]]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

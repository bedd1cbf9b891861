"""Real processes the benchmark drives: a private redis-server, celery workers, a receiver.

Patterns from ``tests/support.py``: every process starts in its own session on a free
loopback port, is waited on by what it prints or answers, and is killed (its whole process
group) when the benchmark is done with it, whatever state it is in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.02) -> object:
    """Poll ``predicate`` until truthy; raise naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A throw-away redis-server on a free loopback port (never 6379), no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}") from None
            return False

    def stop(self) -> None:
        _kill_group(self._proc)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


class Worker:
    """A real ``celery worker`` (prefork by default) in its own session."""

    def __init__(self, app: str, env: Mapping[str, str], *, concurrency: int = 2,
                 extra: tuple[str, ...] = ()) -> None:
        args = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork",
                "-c", str(concurrency), "-n", f"b{uuid.uuid4().hex[:8]}@%h", "--loglevel=INFO",
                "-Q", env["BENCH_QUEUE"], "--without-gossip", "--without-mingle",
                "--without-heartbeat", *extra]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(" ready." in line for line in self.lines):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready (exit {self.proc.poll()}):\n"
                                       f"{self.tail()}")
                self._cond.wait(0.2)
        return self

    def child_pids(self) -> list[int]:
        return children_of(self.proc.pid)

    def rss_kib(self) -> dict[str, int]:
        """VmRSS of the main process and each pool child, in KiB."""
        result = {"main": vm_rss_kib(self.proc.pid)}
        for n, pid in enumerate(sorted(self.child_pids())):
            result[f"child{n}"] = vm_rss_kib(pid)
        return result

    def stop(self, timeout: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL the group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        _kill_group(self.proc)


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
        _kill_group(self.proc)

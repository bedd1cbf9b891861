"""The shipper in a process of its own, so shipping never competes with Celery's consumer loop.

The worker's main process runs Celery's consumer loop; reading the spool, encoding OTLP and
gzip there would take its interpreter lock from dispatch. So the main process starts
``python -m tracing.shipping._shipper_main`` and only supervises it (``ShipperProcess``):

* **Control** is the child's stdin, a pipe: the main process writes the pickled ``Config``
  first (length-prefixed), then one byte per command (non-blocking): ``w`` ship now, ``s``
  stop (last bounded attempt, then exit). End of file — the main process is gone, however it
  died — means stop too, so the shipper never outlives its worker by more than the shutdown
  bound. The child ignores SIGTERM and SIGINT (sent to a whole process group, they would
  skip that last attempt); SIGKILL still ends it, and its records stay on disk.
* **The lock**: the child takes the spool's ``ShipperLock``; the main process never does.
* **Restarts**: a supervising thread (blocked in ``wait()``, costing nothing) restarts a
  child that died, after 1 s, then up to 30 s between tries.
* **Closing attempts** of dead pool children (``close_attempt``) stays in the main process:
  it reads the spool's open attempts itself (``_attempts``) and appends the closing record to
  its own segment; the child only ships. The child closes orphans after the grace period as
  before, and sees the main process's closing records, so an attempt is closed once.
* **State** (``state()``) is the status file the child rewrites at most twice a second: a
  small JSON read, never a spool scan.

Pool children forked after it started close their copy of the pipe at once (``_runtime``'s
at-fork hook calls ``detach_in_child``), or the shipper would not see end of file when the
main process dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from tracing._config import Config
from tracing.shipping._status import STATUS_FILE, ShipperStats, read_status, reserve_status
from tracing.spool import SegmentWriter, ensure_spool_dir
from tracing.spool._attempts import AttemptCloser, AttemptIndex
from tracing.spool._drops import reserve_ledger
from tracing.spool._exporter import SpoolExporter

logger = logging.getLogger("celery_langfuse")

_LEN = struct.Struct("<I")
WAKE, STOP = b"w", b"s"
_FIELDS = set(ShipperStats.__dataclass_fields__)


class ShipperProcess:
    """The main process's handle on the shipping process: start, wake, stop, supervise."""

    def __init__(self, config: Config, exporter: SpoolExporter) -> None:
        self.config = config
        self.spool_dir = config.spool_dir
        self.index = AttemptIndex(self.spool_dir)
        self.closer = AttemptCloser(self.index, lambda frame: exporter.write(frame, 1))
        self.restarts = 0
        self._last_status: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._pid = os.getpid()

    # -- the Shipper interface the task path and the operator use ----------------------------

    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="celery-langfuse-shipper-supervisor")
        self._supervisor.start()

    def wake(self) -> None:
        self._send(WAKE)

    def close_attempt(
        self, task_id: str, reason: str, *, level: str = "ERROR", final_state: str = "FAILURE"
    ) -> bool:
        """Write the closing observation of a task whose process died; the child ships it."""
        closed = self.closer.close(task_id, reason, level=level, final_state=final_state)
        if closed:
            self.wake()
        return closed

    def state(self) -> dict[str, Any]:
        """The child's counters as of its last status write (a small file, no spool scan)."""
        data = read_status(self.spool_dir) or self._last_status
        self._last_status = data  # kept: an update caught half done reads as nothing
        state = {name: data.get(name) for name in _FIELDS}
        state["attempts_closed"] = (data.get("attempts_closed") or 0) + self.closer.closed_count
        state["pending_bytes"] = data.get("pending_bytes") or 0
        proc = self._proc
        state["shipper_pid"] = proc.pid if proc is not None else None
        state["shipper_restarts"] = self.restarts
        return state

    @property
    def stats(self) -> ShipperStats:
        state = self.state()
        return ShipperStats(**{name: state[name] for name in _FIELDS})

    def pending_bytes(self) -> int:
        return int(self.state()["pending_bytes"])

    def stop(self, timeout: float) -> None:
        """The child's last bounded attempt; returns within ``timeout`` + the HTTP timeout."""
        self._stopping.set()
        self._send(STOP)
        with self._lock:
            proc, control = self._proc, self._control
            self._control = None
        if control is not None:
            with contextlib.suppress(OSError):
                control.close()
        if proc is None:
            return
        try:
            proc.wait(timeout + self.config.http_timeout + 2.0)
        except subprocess.TimeoutExpired:
            logger.error("celery-langfuse: the shipper process %d did not stop in time; "
                         "killed (records it was sending stay on disk)", proc.pid)
            proc.kill()
            proc.wait(5)

    # -- supervision -------------------------------------------------------------------------

    def _spawn(self) -> None:
        ensure_spool_dir(self.spool_dir)
        # Before any task can fill the disk: the shipper's counters then always have a place.
        reserve_status(self.spool_dir)
        reserve_ledger(self.spool_dir)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tracing.shipping._shipper_main"],
            stdin=subprocess.PIPE, bufsize=0, close_fds=True,
        )
        assert proc.stdin is not None
        blob = pickle.dumps(self.config)
        proc.stdin.write(_LEN.pack(len(blob)) + blob)
        # A wake must never block the consumer loop, even if the child stopped reading.
        os.set_blocking(proc.stdin.fileno(), False)
        with self._lock:
            self._proc, self._control = proc, proc.stdin

    def _supervise(self) -> None:
        delay = 1.0
        while True:
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.wait(0) or os.getpid() != self._pid:
                return
            logger.error("celery-langfuse: the shipper process exited (status %s); restarting "
                         "it in %.0fs. Records stay on disk meanwhile.", code, delay)
            if self._stopping.wait(delay):
                return
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            try:
                self._spawn()
                self.restarts += 1
            except Exception:
                logger.exception("celery-langfuse: could not restart the shipper process")

    def _send(self, command: bytes) -> None:
        control = self._control
        if control is None or os.getpid() != self._pid:
            return
        with contextlib.suppress(OSError, ValueError):
            control.write(command)

    def detach_in_child(self) -> None:
        """In a forked child (the runtime's at-fork hook): close our copy of the pipe.

        A pool child must not keep it open: the shipper would never see end of file if the
        main process died. Unbuffered, so closing writes nothing.
        """
        control, self._control = self._control, None
        self._proc = None
        if control is not None:
            with contextlib.suppress(OSError):
                control.close()


# --------------------------------------------------------------------------- the child


def _read_config(stream: IO[bytes]) -> Config:
    size = _LEN.unpack(stream.read(_LEN.size))[0]
    config = pickle.loads(stream.read(size))
    if not isinstance(config, Config):
        raise TypeError(f"expected a Config, got {type(config).__name__}")
    return config


def main() -> None:
    """Run the shipper until told to stop or the main process is gone (end of file)."""
    from tracing.shipping._shipper import Shipper

    # The worker's main process decides when shipping stops (STOP, or end of file when it is
    # gone): a SIGTERM or Ctrl-C sent to the whole process group must not skip the last
    # bounded attempt the warm shutdown asks for.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    config = _read_config(stdin)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"[%(asctime)s: %(levelname)s/celery-langfuse-shipper {os.getpid()}] %(message)s",
    )
    shipper = Shipper(config, SpoolExporter(SegmentWriter(config.spool_dir)),
                      status_interval=0.5)
    shipper.start()
    while True:
        command = stdin.read(1)
        if command == WAKE:
            shipper.wake()
            continue
        break  # STOP, or end of file: the main process is gone
    shipper.stop(config.shutdown_timeout)
    logging.getLogger("celery_langfuse").debug("shipper process done; status in %s",
                                               config.spool_dir / STATUS_FILE)

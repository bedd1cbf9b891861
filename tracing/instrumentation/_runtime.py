"""The per-process tracing runtime: who writes spans where, and who ships them.

A worker's main process builds the runtime at ``worker_init`` (before the pool forks): the
spool writer, the spool exporter, the Langfuse client wired to it, and — only there — the
shipper: a process of its own (``_shipproc``), started and supervised by the main process, so
shipping never takes the interpreter lock from Celery's consumer loop. Prefork children
inherit the runtime through ``fork``: the writer reopens a segment named after the child on
its first write, OpenTelemetry's batch processor restarts its thread, and the shipper
reference is dropped (only the main process supervises). ``ship="thread"`` ships from a
thread of the calling process instead (``Shipper``).
"""

from __future__ import annotations

# Imported here, in the main process before the pool forks: socket.getaddrinfo imports it
# lazily on first use, and a pool child forked while another thread of the main process
# (an SDK thread, a shipper thread) held its import lock waits for that lock forever
# (observed: a child stuck in its first Redis connect).
import encodings.idna  # noqa: F401
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any

from langfuse import Langfuse

from tracing._config import Config
from tracing.instrumentation._client import attach_langfuse
from tracing.shipping._handoff_drain import with_broker
from tracing.shipping._shipper import Shipper
from tracing.shipping._shipproc import ShipperProcess
from tracing.spool import SegmentWriter, ensure_spool_dir
from tracing.spool._exporter import SpoolExporter

logger = logging.getLogger("celery_langfuse")


@dataclass
class Runtime:
    """Everything one process needs to trace tasks into the spool."""

    config: Config
    exporter: SpoolExporter
    client: Langfuse
    processor: Any  # the SDK's LangfuseSpanProcessor, redirected to the spool
    shipper: Shipper | ShipperProcess | None
    main_pid: int

    def flush(self) -> None:
        """Move every ended span of this process into the spool (local, no network)."""
        self.processor.force_flush()

    def write_frames(self, frames: bytes) -> None:
        self.exporter.write(frames, 0)

    def _forget_shipper_in_child(self) -> None:
        # Only the main process ships: a forked child must never touch the shipper's lock,
        # cursors or HTTP client, which it shares with its parent after fork.
        if os.getpid() != self.main_pid:
            if isinstance(self.shipper, ShipperProcess):
                self.shipper.detach_in_child()
            self.shipper = None


_runtime: Runtime | None = None


def current() -> Runtime | None:
    return _runtime


def start(config: Config, *, ship: bool | str = True) -> Runtime:
    """Build this process's runtime (idempotent) and start the shipper if ``ship``.

    ``ship=True`` (or ``"process"``): a shipping process of its own; ``"thread"``: a thread
    of this process; ``False``: none (another process ships this spool).
    """
    global _runtime
    if _runtime is not None and _runtime.config == config:
        return _runtime
    spool_dir = ensure_spool_dir(config.spool_dir)
    writer = SegmentWriter(spool_dir)
    exporter = SpoolExporter(writer)
    client, processor = attach_langfuse(config, exporter)
    shipper: Shipper | ShipperProcess | None = None
    ship_config = with_broker(config)  # a shipping process has no Celery app to ask
    if ship == "thread":
        shipper = Shipper(ship_config, exporter)
    elif ship:
        shipper = ShipperProcess(ship_config, exporter)
    runtime = Runtime(config, exporter, client, processor, shipper, os.getpid())
    ref = weakref.WeakMethod(runtime._forget_shipper_in_child)

    def after_fork_in_child() -> None:
        # A weak reference, so the at-fork registry (which can never be cleared) does not keep
        # an old runtime alive; the same pattern as OpenTelemetry's BatchProcessor.
        method = ref()
        if method is not None:
            method()

    os.register_at_fork(after_in_child=after_fork_in_child)
    if shipper is not None:
        shipper.start()
    _runtime = runtime
    return runtime


def stop() -> None:
    """Flush this process's spans to the spool; in the main process, ship with a bound."""
    global _runtime
    runtime = _runtime
    if runtime is None:
        return
    try:
        runtime.flush()
    except Exception:
        logger.exception("celery-langfuse: flushing spans to the spool failed")
    if runtime.shipper is not None and os.getpid() == runtime.main_pid:
        runtime.shipper.stop(runtime.config.shutdown_timeout)
        runtime.shipper = None

"""A producer's spool: records written by a process that runs no worker, and who ships them.

Three things are written outside a worker: scores (``_scores``), the root observation of a
canvas sent from outside any trace (``_canvas``) and the spans of tasks run eagerly
(``task_always_eager`` or ``task.apply()``, ``_eager``). Each is a local append to the
configured spool directory (``CELERY_LANGFUSE_SPOOL_DIR``, else the default): durable at the
call, no network on the caller's path.

**Who ships them.**

* In a worker (its main process or a pool child: the worker's tracing runtime exists), the
  records go to the worker's spool and the worker's shipper sends them.
* In any other process, the first record starts a small shipper thread in this process
  (built off the caller's path). One shipper per spool (``flock``): when a worker on the same
  host ships that directory, it sends the records and this thread only waits. At exit, a last
  attempt bounded by ``CELERY_LANGFUSE_SHUTDOWN_TIMEOUT``; what Langfuse did not take goes to
  the deployment's Redis stream when a hand-off store is configured (``_handoff``: a web
  container's disk may be thrown away with it), else stays on disk, said in one log line,
  for the next shipper of that directory (the next record of this program, a worker using
  it, or ``python -m tracing drain``).
* No Langfuse keys in this process: records are still written, no shipper starts (it would
  only be refused), one warning names the variables; a shipper with keys sends them later.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Any, TypeGuard

from tracing._config import Config, load_config
from tracing.instrumentation import _runtime
from tracing.spool import SegmentWriter, SpoolError

__all__ = ["current_config", "eager_runtime", "sampled", "wake", "write"]

logger = logging.getLogger("celery_langfuse")

_lock = threading.Lock()
_pid = 0
_config: Config | None = None
_writers: dict[Any, SegmentWriter] = {}
_shipper: Any = None  # this producer's shipper (False: none can run), started on first use
_eager: _runtime.Runtime | None = None  # the runtime this module built for eager tasks
_warned: set[str] = set()
_instrument: Any = None  # tracing.instrumentation._instrument, imported on first use


def current_config() -> Config:
    """The configuration in force: a worker's runtime's, else ``instrument()``'s (the latest
    call), else the eager runtime's, else the environment's (read once)."""
    global _config, _instrument
    runtime = _runtime.current()
    if _in_worker(runtime):
        return runtime.config
    if _config is None:
        if _instrument is None:  # it imports the task handlers, which use this module
            from tracing.instrumentation import _instrument
        if _instrument._config is not None:
            return _instrument._config
        if runtime is not None:
            return runtime.config
        _config = load_config()
    return _config


def sampled(config: Config, trace_id: str) -> bool:
    """The trace's own sampling decision (a trace-id ratio, as the workers' sampler)."""
    if config.sample_rate >= 1:
        return True
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    decision = TraceIdRatioBased(config.sample_rate).should_sample(
        parent_context=None, trace_id=int(trace_id, 16), name="producer")
    return bool(decision.decision == Decision.RECORD_AND_SAMPLE)


def _in_worker(runtime: _runtime.Runtime | None) -> TypeGuard[_runtime.Runtime]:
    """A worker's runtime (its main process or a pool child), not this module's eager one."""
    return runtime is not None and runtime is not _eager


def write(config: Config, frame: bytes) -> None:
    """Append ``frame`` to this process's spool and make sure someone ships it."""
    with _lock:
        _forget_after_fork()
        writer = _writers.get(config.spool_dir)
        if writer is None:
            # A writer of its own: these records never share a segment with a task's spans.
            writer = _writers[config.spool_dir] = SegmentWriter(config.spool_dir)
        writer.append(frame)
        runtime = _runtime.current()
        if _in_worker(runtime):
            if runtime.shipper is not None:
                runtime.shipper.wake()
            return  # a worker: its shipper sends the spool
        _ensure_shipper(config)


def wake() -> None:
    """New records are on this producer's spool (an eager task ended): ship them soon."""
    shipper = _shipper
    if shipper:
        shipper.wake()


def eager_runtime(config: Config) -> _runtime.Runtime | None:
    """The tracing runtime for tasks run eagerly in this process (not a worker): the SDK wired
    to the spool, shipped by this producer's shipper thread. None without keys."""
    global _eager
    runtime = _runtime.current()
    if runtime is not None and (runtime is not _eager or runtime.config == config):
        return runtime
    if not (config.enabled and config.has_keys):
        return None
    with _lock:
        _forget_after_fork()
        try:
            _eager = _runtime.start(config, ship=False)
        except SpoolError as exc:
            _warn_once(f"spool:{config.spool_dir}", "celery-langfuse: %s. Eager tasks run "
                       "untraced until this is fixed.", exc)
            return None
        _ensure_shipper(config)
    return _eager


def _forget_after_fork() -> None:
    global _pid, _shipper
    if _pid != os.getpid():  # first use, or a forked child: no shipper thread here
        _pid, _shipper = os.getpid(), None


def _ensure_shipper(config: Config) -> None:
    global _shipper
    if (_shipper is not None and _shipper is not False and _shipper.config is not config
            and _shipper.config != config):  # identity first: comparing every field costs
        _shipper.stop(0.5)  # instrument() changed the keys or the spool: ship with the new
        _shipper = None
    if _shipper is None:
        _start_shipper(config)
    elif _shipper is not False:
        _shipper.wake()


def _start_shipper(config: Config) -> None:
    global _shipper
    if not config.has_keys:
        _shipper = False
        _warn_once(
            "keys", "celery-langfuse: LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY are not set "
            "in this process: its records (scores, canvas roots) are kept in %s and sent by a "
            "shipper that has them (a worker on that directory, or `python -m tracing drain`)",
            config.spool_dir)
        return
    # Built in a thread of its own: its HTTP clients cost tens of milliseconds (TLS context),
    # which must not land on the first caller. The hand-off store's client (redis) is imported
    # there too, or at exit; importing it at exit needs concurrent.futures.thread, which
    # cannot be imported once the interpreter shuts down: import that now (0.3 ms, once).
    import concurrent.futures.thread  # noqa: F401

    _shipper = _ProducerShipper(config)
    atexit.register(_stop_shipper, _shipper, config)


class _ProducerShipper:
    """This process's shipper thread, built off the caller's path; ``wake`` / ``stop``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shipper: Any = None
        self._ready = threading.Thread(target=self._build, name="celery-langfuse-producer",
                                       daemon=True)
        self._ready.start()

    def _build(self) -> None:
        from tracing.shipping import _handoff  # noqa: F401  (imported now: no import works at exit)
        from tracing.shipping._shipper import Shipper
        from tracing.spool._exporter import SpoolExporter

        try:
            shipper = Shipper(self.config, SpoolExporter(SegmentWriter(self.config.spool_dir)))
            shipper.start()
        except Exception:
            logger.exception("celery-langfuse: could not start this producer's shipper; its "
                             "records stay in %s", self.config.spool_dir)
            return
        self.shipper = shipper

    def wake(self) -> None:
        if self.shipper is not None:
            self.shipper.wake()

    def stop(self, timeout: float) -> None:
        self._ready.join(timeout)
        if self.shipper is not None:
            self.shipper.stop(timeout, report=False)  # _stop_shipper says what stays


def _stop_shipper(shipper: Any, config: Config) -> None:
    """At exit: eager spans to the spool, one last attempt, bounded; then the hand-off store,
    else one log line per kind of record left."""
    if shipper is not _shipper or os.getpid() != _pid:
        return
    try:
        if _eager is not None:
            _eager.flush()
        shipper.stop(config.shutdown_timeout)
        spans, scores = _left(config.spool_dir)
        if spans or scores:
            _hand_off(config)
            spans, scores = _left(config.spool_dir)
    except Exception:
        logger.exception("celery-langfuse: stopping this producer's shipper failed")
        return
    for count, what in ((scores, "score(s)"), (spans, "span(s)")):
        if count:
            logger.warning(
                "celery-langfuse: %d %s not delivered to Langfuse yet stay in %s; the next "
                "shipper of that directory sends them (this program's next run, a worker "
                "using it, or `python -m tracing drain`)", count, what, config.spool_dir)


def _hand_off(config: Config) -> int:
    """What Langfuse did not take, into the deployment's Redis stream (``_handoff``), which
    every worker's shipper drains; only if no other shipper holds this spool (a worker on
    the same directory ships it anyway). Bounded by the shutdown timeout; Redis unreachable:
    the records stay on disk (``handoff_remaining`` logs it)."""
    import time

    from tracing.shipping._handoff import (
        HandoffStore,
        deployment_key,
        handoff_remaining,
        resolve_handoff_url,
    )
    from tracing.shipping._handoff_drain import broker_url
    from tracing.shipping._reader import SpoolReader
    from tracing.shipping._status import ShipperStats
    from tracing.spool import ShipperLock

    url = resolve_handoff_url(config.handoff_url, broker_url())
    if url is None:
        return 0
    lock = ShipperLock(config.spool_dir)
    if not lock.acquire():
        return 0
    try:
        store = HandoffStore(url, deployment_key(config.base_url, config.public_key))
        try:
            return handoff_remaining(
                store, SpoolReader(config.spool_dir, ShipperStats()), spool_dir=config.spool_dir,
                deadline=time.monotonic() + config.shutdown_timeout)
        finally:
            store.close()
    finally:
        lock.release()


def _left(spool_dir: Any) -> tuple[int, int]:
    """Span and score records on the spool past their segment's cursor (scans them)."""
    from tracing.shipping._reader import count_pending

    left = count_pending(Path(spool_dir))
    return left.spans, left.scores


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)

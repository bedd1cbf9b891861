"""Scores from anywhere, never lost: attach a score to a task's trace knowing only the task id.

A task's trace id is derived from its root task id (``_task_span``), so any process that knows
the id can score it — a web service recording user feedback, say — without a round trip to the
worker or to Langfuse.

**Durable at the call, no network on the caller's path.** ``score_task`` validates the score,
builds its ``score-create`` ingestion event (``_score_record``) and appends it to the spool as a
``KIND_SCORE`` record: one local ``write``, tens of microseconds, whatever Langfuse is doing.
The shipper sends it to ``/api/public/ingestion`` under the spans' rules (``_score_sending``):
back off and keep while Langfuse is down, set a rejected score aside alone, never a second
score (every score has an id, so a resend is an upsert).

**Who ships it.**

* In a worker (its main process or a pool child: the tracing runtime exists), the score goes
  to the worker's spool and the worker's shipper sends it.
* In any other process (a web app, a script, ``python -m tasks score``), the score goes to the
  configured spool directory (``CELERY_LANGFUSE_SPOOL_DIR``, else the default) and the first
  score starts a small shipper thread in this process. One shipper per spool (``flock``): when
  a worker on the same host ships that directory, it sends the scores and this thread only
  waits. At exit, a last attempt bounded by ``CELERY_LANGFUSE_SHUTDOWN_TIMEOUT``; what Langfuse
  did not take stays on disk, said in one log line, for the next shipper of that directory
  (the next score of this program, a worker using it, or ``python -m tracing drain``).
  When no worker ships that directory and a hand-off store is configured
  (``CELERY_LANGFUSE_HANDOFF_URL``, by default the Celery broker when it is Redis), those
  records go to the deployment's Redis stream instead, which every worker's shipper drains
  (``_handoff``): a web container's disk may be thrown away with it.
* No Langfuse keys in this process: the score is still written, no shipper starts (it would
  only be refused), one warning names the variables; a shipper with keys sends it later.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from tracing._config import Config, load_config
from tracing.instrumentation import _instrument, _runtime
from tracing.instrumentation._task_span import root_observation_id_for, trace_id_for
from tracing.spool import (
    KIND_SCORE,
    SegmentWriter,
    encode_frame,
)
from tracing.spool._score_record import encode_event, score_event

__all__ = ["pending_scores", "score_task"]

logger = logging.getLogger("celery_langfuse")

_lock = threading.Lock()
_pid = 0
_config: Config | None = None
_writers: dict[Any, SegmentWriter] = {}
_shipper: Any = None  # this producer's Shipper, started on first use
_warned: set[str] = set()


def score_task(
    task_id: str,
    name: str,
    value: float | int | bool | str,
    *,
    comment: str | None = None,
    root_id: str | None = None,
    client: Any = None,
    data_type: str | None = None,
    observation: bool = False,
    observation_id: str | None = None,
    score_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    environment: str | None = None,
    timestamp: datetime | None = None,
) -> str:
    """Score the trace of ``task_id`` (pass ``root_id`` for a task inside a canvas); durable.

    ``value``: a number (NUMERIC), a string (CATEGORICAL) or a bool (BOOLEAN); ``data_type``
    says it explicitly (``"BOOLEAN"`` with 0/1). By default the score is on the whole trace;
    ``observation=True`` puts it on the task's own observation, which is known from the id
    only for a tree's root task (its first attempt); for any other observation pass its
    ``observation_id``. ``score_id``: your id for the score; by default one derived from the
    target and ``name``, so scoring the same name on the same target again replaces the value
    (an upsert) and a resend never makes a second score. ``client`` is accepted for
    compatibility and unused: scores no longer go through the SDK.

    Returns the trace id scored, once the score is on local disk (no network call; it never
    waits for Langfuse). Raises ``ValueError`` for a value Langfuse would refuse, and
    ``OSError`` if the spool cannot be written (then the score is not recorded).
    """
    del client
    root = root_id or task_id
    trace_id = trace_id_for(root)
    if observation and observation_id is None:
        if root != task_id:
            raise ValueError(
                f"task {task_id} is not the root of its tree ({root}): its observation id is "
                "not derived from the task id; pass observation_id=..., or score the trace"
            )
        observation_id = root_observation_id_for(root)
    config = _current_config()
    if not config.enabled:
        return trace_id
    event = score_event(
        trace_id=trace_id, name=name, value=value, observation_id=observation_id,
        data_type=data_type, comment=comment, score_id=score_id,
        environment=environment or config.environment, metadata=metadata, timestamp=timestamp,
    )
    if not _sampled(config, trace_id):
        return trace_id
    _write(config, encode_frame(KIND_SCORE, encode_event(event)))
    return trace_id


def _current_config() -> Config:
    runtime = _runtime.current()
    if runtime is not None:
        return runtime.config
    global _config
    if _config is None:
        _config = _instrument._config or load_config()
    return _config


def _sampled(config: Config, trace_id: str) -> bool:
    """The trace's own sampling decision (the SDK's rule for scores): no score on a dropped
    trace."""
    if config.sample_rate >= 1:
        return True
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    decision = TraceIdRatioBased(config.sample_rate).should_sample(
        parent_context=None, trace_id=int(trace_id, 16), name="score")
    return bool(decision.decision == Decision.RECORD_AND_SAMPLE)


def _write(config: Config, frame: bytes) -> None:
    global _pid, _shipper
    with _lock:
        if _pid != os.getpid():  # first use, or a forked child: no shipper thread here
            _pid, _shipper = os.getpid(), None
        writer = _writers.get(config.spool_dir)
        if writer is None:
            # A writer of its own: score records never share a segment with spans.
            writer = _writers[config.spool_dir] = SegmentWriter(config.spool_dir)
        writer.append(frame)
        runtime = _runtime.current()
        if runtime is not None:
            if runtime.shipper is not None:
                runtime.shipper.wake()
            return  # a worker: its shipper sends the spool
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
            "in this process: scores are kept in %s and sent by a shipper that has them (a "
            "worker on that directory, or `python -m tracing drain`)", config.spool_dir)
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
        self._ready = threading.Thread(target=self._build, name="celery-langfuse-scores",
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
            logger.exception("celery-langfuse: could not start the score shipper; scores stay "
                             "in %s", self.config.spool_dir)
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
    """At exit: one last attempt, bounded; then the hand-off store, else one log line."""
    if shipper is not _shipper or os.getpid() != _pid:
        return
    try:
        shipper.stop(config.shutdown_timeout)
        left = pending_scores(config.spool_dir)
        if left:
            _hand_off(config)
            left = pending_scores(config.spool_dir)
    except Exception:
        logger.exception("celery-langfuse: stopping the score shipper failed")
        return
    if left:
        logger.warning(
            "celery-langfuse: %d score(s) not delivered to Langfuse yet stay in %s; the next "
            "shipper of that directory sends them (this program's next score, a worker using "
            "it, or `python -m tracing drain`)", left, config.spool_dir)


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


def pending_scores(spool_dir: Any) -> int:
    """Score records on the spool past their segment's cursor (scans the unshipped bytes)."""
    from tracing.shipping._reader import count_pending

    return count_pending(Path(spool_dir)).scores


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)

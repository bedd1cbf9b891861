"""Delivery: the guarantee. The shipper's loop, and a map of where each rule lives.

Spans reach the spool as local writes (``_exporter``); the shipper is the only thing that
takes them off it. One shipper runs per spool, kept alone by an exclusive ``flock``
(``_spool.ShipperLock``). Each ``cycle``:

1. **Adopts and closes** (``_attempts.AttemptCloser``): open attempts of processes dead for
   ``orphan_grace`` seconds are closed as ERROR under their own ids.
2. **Bounds disk** (``_reader.SpoolReader.enforce_cap``): past ``spool_max_bytes`` unshipped,
   the oldest records are skipped, counted and logged.
3. **Reads a batch** (``_reader``): every segment on the spool — live writers, recycled pool
   children, a SIGKILLed worker, a previous run — from its cursor, in windows; corrupt
   records set aside, the torn tail of a dead writer cut. What the attempt index read in
   step 1 (every segment to its end) is handed to the reader (``SpoolReader.offer``), so at
   a steady trickle each new record is read and checksummed once, not twice.
4. **Sends it** (``_sending.BatchSender`` over ``_transport``; one request, each resource
   and scope encoded once) and applies the rules (``_delivery``, pure functions: done /
   split / reject / pause / back off / unknown). A batch whose outcome is unknown (a
   timeout) is resent alone before anything new.
5. **Cleans up**: the shipped prefix of every segment is punched out of the disk as soon as
   its cursor is written (``_reader.SpoolReader.free_space``); finished, fully shipped
   segments are removed.

Every span that never reaches Langfuse is counted in the status by cause (``_status``):
dropped by writers (their ``KIND_DROPPED`` records and the spool's drop ledger, which a full
disk cannot stop), at the cap, or unreadable (corrupt bytes, torn tails); while that total
grows, one log line every ``DROP_LOG_INTERVAL`` seconds gives it.

A full batch is followed at once by the next; after a partial one (caught up) spans gather
for ``linger`` seconds (1 s, like the SDK's flush interval) unless something wakes the
shipper (a flush, a closed attempt, stop), so a steady trickle costs one request a second,
not one per poll. With nothing to send it looks again every ``poll_interval``.

6. **Drains the hand-off stream** (``_handoff``): one batch of what stopped workers of the
   deployment left in its Redis, under the same rules, after each pass.

:meth:`Shipper.stop` makes a last attempt bounded by a timeout; what is left is handed off to
that stream (``_handoff``: the disk may go with the worker), or, with no Redis, stays on disk
for the next start or ``python -m tracing drain``. The lock is released only once the shipping
thread has ended, so a second shipper can never send what this one is still sending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tracing._config import Config
from tracing.shipping._handoff import handoff_remaining
from tracing.shipping._handoff_drain import drainer_for
from tracing.shipping._reader import SpoolReader, count_pending, delete_finished, enforce_cap
from tracing.shipping._sending import BatchSender
from tracing.shipping._status import STATUS_FILE, ShipperStats, reserve_status, write_status
from tracing.shipping._transport import HttpTransport, Transport
from tracing.spool import ScanResult, SegmentId, ShipperLock, writer_alive
from tracing.spool._attempts import AttemptCloser, AttemptIndex
from tracing.spool._drops import read_ledger, totals_by_cause
from tracing.spool._exporter import SpoolExporter

__all__ = ["STATUS_FILE", "Shipper", "ShipperCore", "ShipperStats"]

logger = logging.getLogger("celery_langfuse")

DROP_LOG_INTERVAL = 30.0


class ShipperCore:
    """Ships one spool to Langfuse in the caller's thread: ``cycle`` once, or ``drain``."""

    def __init__(
        self, config: Config, exporter: SpoolExporter, *, transport: Transport | None = None,
        poll_interval: float = 0.2, batch_max_spans: int = 1000,
        batch_max_bytes: int = 3 * 1024 * 1024, orphan_grace: float = 5.0,
        alive: Callable[[SegmentId], bool] = writer_alive, status_interval: float = 1.0,
        linger: float = 1.0,
    ) -> None:
        self.config = config
        self.spool_dir = config.spool_dir
        self.exporter = exporter
        self.transport: Transport = transport or HttpTransport(config)
        self.stats = ShipperStats()
        self.poll_interval = poll_interval
        # After a partial batch (caught up), spans gather this long before the next request,
        # unless woken: at a steady trickle a request then carries ``linger`` seconds of spans
        # (like the SDK's own 1 s flush interval), not ``poll_interval``'s handful.
        self.linger = linger
        self.orphan_grace = orphan_grace
        self.reader = SpoolReader(self.spool_dir, self.stats, batch_max_spans=batch_max_spans,
                                  batch_max_bytes=batch_max_bytes, alive=alive)
        # One read of each new record per cycle: the index's scans feed the batch reader.
        self.index = AttemptIndex(self.spool_dir, alive, on_scan=self._offer)
        self._cycling: int | None = None  # the thread in ``cycle`` (the reader is not shared)
        self.closer = AttemptCloser(self.index, lambda frame: exporter.write(frame, 1))
        self.sender = BatchSender(config, self.transport, self.reader, self.stats)
        self._lock = ShipperLock(self.spool_dir)
        self._has_lock = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._final_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._batch_was_full = False
        self._status_written = -1e9
        self.status_interval = status_interval
        self._lost_logged = 0  # the lost-span total the last log line gave
        self._lost_logged_at = -1e9
        # The deployment's hand-off stream (``_handoff``): drained while running, fed at stop.
        self.handoff = drainer_for(config, self.spool_dir, self.transport, self.stats)

    # -- the parts the task path and the operator use ----------------------------------------

    def wake(self) -> None:
        """Ship now rather than at the next poll (spans were just written)."""
        self._wake.set()

    def close_attempt(
        self, task_id: str, reason: str, *, level: str = "ERROR", final_state: str = "FAILURE"
    ) -> bool:
        """Write the closing observation of a task whose process died; once per task id."""
        closed = self.closer.close(task_id, reason, level=level, final_state=final_state)
        if closed:
            self.wake()
        return closed

    def state(self) -> dict[str, Any]:
        """Counters and unshipped bytes as of the last cycle: no spool access, microseconds."""
        self.stats.attempts_closed = self.closer.closed_count
        self.stats.pending_bytes = self.reader.pending
        return asdict(self.stats)

    def count_lost(self) -> None:
        """Refresh the lost-span counters (the drop ledger is one small read), and log their
        running total when it grew, at most once per ``DROP_LOG_INTERVAL``."""
        stats = self.stats
        drops = dict(self.reader.reported_drops)
        for cause, count in totals_by_cause(read_ledger(self.spool_dir)).items():
            drops[cause] = drops.get(cause, 0) + count
        stats.dropped_in_writers = drops
        stats.lost_spans = sum(drops.values()) + stats.dropped_at_cap + stats.unreadable_spans
        now = time.monotonic()
        if stats.lost_spans > self._lost_logged and now - self._lost_logged_at >= DROP_LOG_INTERVAL:
            self._lost_logged, self._lost_logged_at = stats.lost_spans, now
            causes = {**drops, "spool_cap": stats.dropped_at_cap,
                      "unreadable": stats.unreadable_spans}
            logger.error(
                "celery-langfuse: %d span(s) of spool %s never reached Langfuse so far (%s); "
                "see `python -m tracing status`", stats.lost_spans, self.spool_dir,
                ", ".join(f"{cause} {n}" for cause, n in sorted(causes.items()) if n))

    def pending_bytes(self) -> int:
        """Unshipped bytes now (stats every segment; the loop keeps ``state()`` current)."""
        return self.reader.pending_bytes()

    def _acquire(self) -> bool:
        if not self._has_lock:
            self._has_lock = self._lock.acquire()
            if self._has_lock:
                logger.info("celery-langfuse: shipping spool %s to %s",
                            self.spool_dir, self.config.base_url)
                reserve_status(self.spool_dir)  # while there is room (see ``_status``)
        return self._has_lock

    def _release(self) -> None:
        self._write_status(force=True)
        if self._has_lock:
            self._lock.release()
            self._has_lock = False

    def drain(self, timeout: float) -> ShipperStats:
        """Ship now, in this thread, until the spool is empty or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        if not self._acquire():
            raise RuntimeError(f"another shipper holds the lock on {self.spool_dir}")
        try:
            while time.monotonic() < deadline:
                if not self.cycle(deadline):
                    wait = self.sender.backoff.not_before - time.monotonic()
                    if wait <= 0 and not self.reader.pending:
                        break
                    time.sleep(max(0.05, min(wait, deadline - time.monotonic(), 1.0)))
        finally:
            self._release()
        return self.stats

    # -- one pass ----------------------------------------------------------------------------

    def cycle(self, deadline: float | None = None) -> bool:
        """Close orphans, enforce the cap, send one batch. True if anything moved."""
        try:
            return self._cycle(deadline)
        finally:
            self._write_status()

    def _offer(self, path: Path, segment: SegmentId, start: int, result: ScanResult) -> None:
        """The index's scan, to the batch reader, when the index reads in this cycle's thread
        (``close_attempt`` may refresh it from another)."""
        if self._cycling == threading.get_ident():
            self.reader.offer(path, segment, start, result)

    def _cycle(self, deadline: float | None) -> bool:
        self._cycling = threading.get_ident()
        try:
            self.index.refresh()
        finally:
            self._cycling = None
        closed = self.closer.close_orphans(self.orphan_grace)
        enforce_cap(self.reader, self.config.spool_max_bytes)
        try:
            if not self.sender.ready():
                return closed
            # A batch whose outcome is unknown goes again alone, before anything new.
            items = self.sender.unknown_batch(self.reader.cursor)
            if items:
                self._batch_was_full = True
            else:
                items, self._batch_was_full = self.reader.next_batch()
            if not items:
                delete_finished(self.reader, self.index.segments_with_open_attempts(),
                                self.index.has_read)
                return closed
            moved = self.sender.deliver(items, deadline)
            self.reader.pending_bytes()
            return moved or closed
        finally:
            self.reader.free_space(self.index.keep_from)

    def _write_status(self, force: bool = False) -> None:
        """The status file (for the CLI and a supervising process), every ``status_interval``."""
        now = time.monotonic()
        if not force and now - self._status_written < self.status_interval:
            return
        self._status_written = now
        self.state()
        self.count_lost()
        write_status(self.spool_dir, self.stats, base_url=self.config.base_url)


class Shipper(ShipperCore):
    """``ShipperCore`` plus a background thread: ``start`` ships until ``stop``."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Ship in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="celery-langfuse-shipper",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float, *, report: bool = True) -> None:
        """Last shipping attempt bounded by ``timeout`` seconds; the rest is handed off to the
        deployment's Redis (``_handoff``) within the HTTP timeout's slack, else stays on disk
        (one log line says what stays, unless ``report`` is off: the caller says it)."""
        started = time.monotonic()
        self._final_deadline = started + timeout
        self.sender.backoff = type(self.sender.backoff)()  # one last attempt, whatever it said
        self.sender.scores.backoff = type(self.sender.backoff)()
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            self._release()
            return
        thread.join(timeout + self.config.http_timeout + 1.0)
        if thread.is_alive():
            # Still inside a send: keep the lock (the thread releases it when it ends, the
            # kernel when the process does) so no other shipper resends those records.
            logger.warning("celery-langfuse: the shipper is still sending after %.1fs; it "
                           "keeps the spool lock until that request ends", timeout)
            return
        self._hand_off(started + timeout + self.config.http_timeout)
        if report:
            self._report_left()

    def _report_left(self) -> None:
        """One line saying what this stop leaves undelivered on disk, and where."""
        try:
            left = count_pending(self.spool_dir, self.reader.cursor)
            attempts = len(list(self.index.open_attempts()))
        except OSError:
            return
        if left.spans or left.scores or attempts:
            logger.warning(
                "celery-langfuse: stopping with %d span(s), %d score(s) and %d open task "
                "attempt(s) not delivered to Langfuse; they stay in %s for the next shipper "
                "of that directory (or `python -m tracing drain`)",
                left.spans, left.scores, attempts, self.spool_dir)

    def _hand_off(self, deadline: float) -> None:
        """What the last attempt left goes to the hand-off stream: this disk may go with the
        worker. Only while holding the spool (a shipper that took it over ships it itself)."""
        if self.handoff is None or not self._acquire():
            return
        try:
            self.index.refresh()
            self.closer.close_orphans(0.0)  # every writer but this process is gone by now
            handoff_remaining(self.handoff.store, self.reader, spool_dir=self.spool_dir,
                              deadline=deadline)
        except Exception:
            logger.exception("celery-langfuse: hand-off failed; the records stay in %s",
                             self.spool_dir)
        finally:
            self._release()

    def _drain_handoff(self) -> bool:
        """One batch from the hand-off stream, under the same rules; never while stopping."""
        if self.handoff is None or self._stopping.is_set():
            return False
        return self.handoff.drain_once() > 0

    def _run(self) -> None:
        try:
            while not self._should_end():
                progressed = False
                try:
                    if self._acquire():
                        progressed = self.cycle(self._final_deadline)
                        progressed = self._drain_handoff() or progressed
                except Exception:
                    logger.exception("celery-langfuse: shipper cycle failed; retrying")
                if self._stopping.is_set() and not progressed:
                    break
                self._wake.wait(self._next_wait(progressed))
                self._wake.clear()
        finally:
            self._release()

    def _should_end(self) -> bool:
        deadline = self._final_deadline
        return self._stopping.is_set() and (deadline is None or time.monotonic() >= deadline)

    def _next_wait(self, progressed: bool) -> float:
        if progressed and (self._batch_was_full or self._stopping.is_set()):
            return 0.0
        if progressed:
            # A partial batch means we caught up: let spans gather (``linger``) rather than
            # send a request per handful of spans (fewer, larger requests).
            return self.linger
        if not self._has_lock:
            return 2.0
        wait = self.sender.backoff.not_before - time.monotonic()
        return max(self.poll_interval, min(wait, 5.0)) if wait > 0 else self.poll_interval

"""Delivery: the guarantee, in one place.

Spans reach the spool as local writes (see ``_exporter``); this module is the only thing that
takes them off it. One shipper runs per spool — the worker's main process, kept alone by an
exclusive ``flock`` (``ShipperLock``) — and it:

1. **Adopts everything on the spool**: segments of live processes, of recycled pool
   children, of a SIGKILLed worker, of a previous run. Each segment has a cursor file with
   the byte offset up to which its records are *done*; shipping resumes there.
2. **Sends batches** of span records to ``{LANGFUSE_BASE_URL}/api/public/otel/v1/traces`` as
   gzip protobuf with the SDK's own headers. A batch's body is the concatenation of one-span
   ``ExportTraceServiceRequest`` messages, which protobuf parses as one merged request.
3. **Judges by status code** (Langfuse answers JSON, not OTLP):

   ============================  =====================================================
   2xx                           done: the cursor moves past the records; never resent
   400 / 413 / 422               split the batch in halves until the offending record is
                                 alone; only it goes to ``dead-letter/`` with the reason
   401 / 403                     pause: one log line naming the public key, records kept,
                                 retried every ``auth_retry_interval`` and at next start
   429, 5xx, other, network      back off exponentially with jitter (monotonic clock),
                                 never earlier than ``Retry-After``; no give-up, no drop
   ============================  =====================================================

   A record is sent again only when the outcome of its send is unknown (a timeout or reset
   after the request left): duplicates are a defect, since Langfuse may store a span twice.
4. **Closes open attempts** of dead processes (see ``_attempts``) under their own ids.
5. **Bounds disk**: past ``spool_max_bytes`` of unshipped records the oldest are dropped,
   counted and logged. Corrupt records are set aside in ``dead-letter/`` and counted; the
   torn tail of a dead writer (killed mid-write) is cut and counted.
6. **Bounds shutdown**: :meth:`Shipper.stop` makes a last attempt bounded by a timeout;
   what is left stays on disk for the next start or ``python -m tracing drain``.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import gzip
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from tracing._attempts import AttemptIndex, OpenAttempt, closing_span
from tracing._config import Config
from tracing._exporter import SpoolExporter, span_frame
from tracing._spool import (
    KIND_SEAL,
    KIND_SPAN,
    ScanResult,
    SegmentId,
    ShipperLock,
    encode_frame,
    list_segments,
    read_cursor,
    remove_segment,
    scan_file,
    write_cursor,
    write_dead_letter,
    writer_alive,
)

logger = logging.getLogger("celery_langfuse")

_WINDOW_SLACK = 256 * 1024  # read past a full batch, so the record ending it is whole
_SPAN_IDS = 24  # a span record's payload starts with its 8-byte span id and 16-byte trace id
_REJECTS = {400, 413, 422}
_AUTH = {401, 403}
STATUS_FILE = "shipper-status.json"


@dataclass(frozen=True)
class SendResult:
    """What one POST came to: a status code, or an error before any status arrived."""

    status: int | None
    retry_after: float | None = None
    error: str | None = None
    body: str = ""


class Transport(Protocol):
    def send(self, body: bytes, timeout: float) -> SendResult: ...

    def close(self) -> None: ...


class HttpTransport:
    """POSTs OTLP protobuf to Langfuse with the same auth and headers as the SDK's exporter."""

    def __init__(self, config: Config) -> None:
        from langfuse._version import __version__ as sdk_version

        token = base64.b64encode(f"{config.public_key}:{config.secret_key}".encode()).decode()
        self.endpoint = config.traces_endpoint
        self._client = httpx.Client(headers={
            "Authorization": f"Basic {token}",
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "x-langfuse-sdk-name": "python",
            "x-langfuse-sdk-version": sdk_version,
            "x-langfuse-public-key": config.public_key or "",
            "x-langfuse-ingestion-version": "4",
            "User-Agent": "celery-langfuse",
        })

    def send(self, body: bytes, timeout: float) -> SendResult:
        try:
            response = self._client.post(
                self.endpoint, content=gzip.compress(body, compresslevel=5), timeout=timeout
            )
        except httpx.HTTPError as exc:
            return SendResult(None, error=f"{type(exc).__name__}: {exc}")
        return SendResult(
            response.status_code,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            body=response.text[:500],
        )

    def close(self) -> None:
        self._client.close()


_SEAL = encode_frame(KIND_SEAL, b"")


def _is_sealed(path: Path) -> bool:
    """A segment whose writer appended the seal frame: it will never grow again."""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - len(_SEAL)))
        return handle.read() == _SEAL


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class ShipperStats:
    """Counters a status command and the logs report; written to ``shipper-status.json``."""

    shipped_spans: int = 0
    requests: int = 0
    dead_lettered: int = 0
    dropped_at_cap: int = 0
    corrupt_records: int = 0
    torn_tails: int = 0
    attempts_closed: int = 0
    last_status: int | None = None
    last_error: str | None = None
    last_success_at: float | None = None
    paused: str | None = None


@dataclass
class _Item:
    """A run of spool bytes that becomes done together: one span record, or bytes to skip."""

    path: Path
    end: int
    payload: bytes | None = None


@dataclass
class _Backoff:
    failures: int = 0
    not_before: float = 0.0  # time.monotonic()
    reported: set[str] = field(default_factory=set)


class Shipper:
    """Ships one spool to Langfuse; see the module docstring for the rules it keeps."""

    def __init__(
        self,
        config: Config,
        exporter: SpoolExporter,
        *,
        transport: Transport | None = None,
        poll_interval: float = 0.2,
        batch_max_spans: int = 1000,
        batch_max_bytes: int = 3 * 1024 * 1024,
        orphan_grace: float = 5.0,
    ) -> None:
        self.config = config
        self.spool_dir = config.spool_dir
        self.exporter = exporter
        self.transport: Transport = transport or HttpTransport(config)
        self.index = AttemptIndex(self.spool_dir)
        self.stats = ShipperStats()
        self.poll_interval = poll_interval
        self.batch_max_spans = batch_max_spans
        self.batch_max_bytes = batch_max_bytes
        self.orphan_grace = orphan_grace
        self.auth_retry_interval = config.auth_retry_interval
        self._lock = ShipperLock(self.spool_dir)
        self._has_lock = False
        self._cursors: dict[Path, int] = {}
        self._backoff = _Backoff()
        self._closed_tasks: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._close_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._final_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._batch_was_full = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Ship in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="celery-langfuse-shipper",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Last shipping attempt bounded by ``timeout`` seconds; the rest stays on disk."""
        self._final_deadline = time.monotonic() + timeout
        self._backoff.not_before = 0.0  # one last attempt now, whatever the backoff said
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + self.config.http_timeout + 1.0)
        self._release()

    def _run(self) -> None:
        while True:
            deadline = self._final_deadline
            if self._stopping.is_set() and (deadline is None or time.monotonic() >= deadline):
                break
            progressed = False
            try:
                if self._acquire():
                    progressed = self.cycle(deadline)
            except Exception:
                logger.exception("celery-langfuse: shipper cycle failed; retrying")
            if self._stopping.is_set() and not progressed:
                break
            self._wake.wait(self._next_wait(progressed))
            self._wake.clear()

    def _next_wait(self, progressed: bool) -> float:
        if progressed and (self._batch_was_full or self._stopping.is_set()):
            return 0.0
        if progressed:
            # A partial batch means we caught up: let spans gather for one poll interval
            # rather than sending a request per handful of spans (fewer, larger requests).
            return self.poll_interval
        return self._idle_wait()

    def _idle_wait(self) -> float:
        if not self._has_lock:
            return 2.0
        wait = self._backoff.not_before - time.monotonic()
        return max(self.poll_interval, min(wait, 5.0)) if wait > 0 else self.poll_interval

    def _acquire(self) -> bool:
        if not self._has_lock:
            self._has_lock = self._lock.acquire()
            if self._has_lock:
                logger.info("celery-langfuse: shipping spool %s to %s",
                            self.spool_dir, self.config.base_url)
        return self._has_lock

    def _release(self) -> None:
        self._write_status()
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
                    wait = self._backoff.not_before - time.monotonic()
                    if wait <= 0 and not self.pending_bytes():
                        break
                    time.sleep(max(0.05, min(wait, deadline - time.monotonic(), 1.0)))
        finally:
            self._release()
        return self.stats

    # -- one pass ----------------------------------------------------------------------------

    def cycle(self, deadline: float | None = None) -> bool:
        """Index, close orphans, enforce the cap, send one batch. True if anything moved."""
        self.index.refresh()
        closed = self._close_orphans()
        self._enforce_cap()
        if time.monotonic() < self._backoff.not_before:
            return closed
        items, self._batch_was_full = self._next_batch()
        if not items:
            self._delete_finished()
            return closed
        moved = self._deliver(items, deadline)
        self._write_status()
        return moved or closed

    def pending_bytes(self) -> int:
        total = 0
        for path, _ in list_segments(self.spool_dir):
            try:
                total += max(0, path.stat().st_size - self._cursor(path))
            except FileNotFoundError:
                continue
        return total

    def _cursor(self, path: Path) -> int:
        if path not in self._cursors:
            self._cursors[path] = read_cursor(path)
        return self._cursors[path]

    def _commit(self, items: list[_Item]) -> None:
        ends: dict[Path, int] = {}
        for item in items:
            ends[item.path] = max(ends.get(item.path, 0), item.end)
        for path, end in ends.items():
            if end > self._cursor(path):
                self._cursors[path] = end
                write_cursor(path, end)

    # -- building a batch --------------------------------------------------------------------

    def _next_batch(self) -> tuple[list[_Item], bool]:
        """The next records to send, and whether they fill a whole batch."""
        items: list[_Item] = []
        spans = size = 0
        for path, segment in list_segments(self.spool_dir):
            for item in self._segment_items(path, segment):
                items.append(item)
                if item.payload is not None:
                    spans += 1
                    size += len(item.payload)
                if spans >= self.batch_max_spans or size >= self.batch_max_bytes:
                    return items, True
        return items, False

    def _segment_items(self, path: Path, segment: SegmentId) -> list[_Item]:
        start = self._cursor(path)
        try:
            size = path.stat().st_size
            if size <= start:
                return []
            result, cut_by_window = self._scan_window(path, start, size)
        except FileNotFoundError:
            return []
        items = [_Item(path, r.end, r.payload if r.kind == KIND_SPAN else None)
                 for r in result.records]
        for first, last in result.corrupt:
            self._set_aside_corrupt(path, first, last)
            items.append(_Item(path, last))
        items.sort(key=lambda item: item.end)
        if result.torn_tail and not cut_by_window and not writer_alive(segment):
            items.append(self._cut_torn_tail(path, result.end))
        return items

    def _scan_window(self, path: Path, start: int, size: int) -> tuple[ScanResult, bool]:
        """Scan about one batch's worth of bytes after ``start``, not the whole segment.

        Re-reading an 8 MiB segment from the cursor for every 3 MiB batch halved shipping
        throughput. A window that holds no whole record (one huge record) is widened.
        """
        window = self.batch_max_bytes + _WINDOW_SLACK
        while True:
            result = scan_file(path, start, window)
            cut_by_window = start + window < size
            if result.records or result.corrupt or not cut_by_window:
                return result, cut_by_window
            window *= 2

    def _set_aside_corrupt(self, path: Path, first: int, last: int) -> None:
        with path.open("rb") as handle:
            handle.seek(first)
            raw = handle.read(last - first)
        write_dead_letter(self.spool_dir, [raw], f"corrupt bytes {first}-{last} of {path.name}")
        self.stats.corrupt_records += 1
        logger.warning(
            "celery-langfuse: %d corrupt bytes at offset %d of %s (bad checksum) set aside in "
            "%s/dead-letter; the records around them are shipped", last - first, first,
            path.name, self.spool_dir,
        )

    def _cut_torn_tail(self, path: Path, end: int) -> _Item:
        size = path.stat().st_size
        self.stats.torn_tails += 1
        logger.warning(
            "celery-langfuse: %s ends in %d bytes of a record its dead writer did not finish "
            "(killed mid-write); they are skipped", path.name, size - end,
        )
        return _Item(path, size)

    # -- sending and judging -----------------------------------------------------------------

    def _deliver(self, items: list[_Item], deadline: float | None) -> bool:
        """Send ``items``; True if all became done, False if shipping must wait."""
        spans = [item for item in items if item.payload is not None]
        if not spans:
            self._commit(items)
            return True
        body = b"".join(item.payload[_SPAN_IDS:] for item in spans if item.payload)
        result = self.transport.send(body, self._request_timeout(deadline))
        self.stats.requests += 1
        self.stats.last_status = result.status
        status = result.status
        if status is not None and 200 <= status < 300:
            self._on_delivered(items, len(spans))
            return True
        if status in _REJECTS:
            return self._on_rejected(items, spans, result, deadline)
        if status in _AUTH:
            self._on_auth_failure(status)
            return False
        self._on_retryable(result)
        return False

    def _request_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.config.http_timeout
        return max(0.2, min(self.config.http_timeout, deadline - time.monotonic()))

    def _on_delivered(self, items: list[_Item], span_count: int) -> None:
        self._commit(items)
        self.stats.shipped_spans += span_count
        self.stats.last_success_at = time.time()
        self.stats.last_error = None
        if self._backoff.failures or self.stats.paused:
            logger.info("celery-langfuse: shipping resumed; Langfuse accepted %d span(s)",
                        span_count)
        self._backoff = _Backoff()
        self.stats.paused = None

    def _on_rejected(
        self, items: list[_Item], spans: list[_Item], result: SendResult, deadline: float | None
    ) -> bool:
        if len(spans) > 1:
            # Langfuse rejects a whole batch for one bad span: halve until it stands alone.
            middle = items.index(spans[len(spans) // 2])
            return self._deliver(items[:middle], deadline) and self._deliver(
                items[middle:], deadline)
        reason = f"HTTP {result.status} from {self.config.base_url}: {result.body}"
        payload = spans[0].payload or b""
        write_dead_letter(self.spool_dir, [payload], reason)
        self._commit(items)
        self.stats.dead_lettered += 1
        logger.error(
            "celery-langfuse: Langfuse rejected span %s (%s); it was set aside in "
            "%s/dead-letter (inspect or replay with `python -m tracing dead-letter`)",
            payload[:8].hex(), reason, self.spool_dir,
        )
        return True

    def _on_auth_failure(self, status: int) -> None:
        message = (
            f"Langfuse answered HTTP {status} for public key {self.config.public_key!r} at "
            f"{self.config.base_url}: shipping is paused and records are kept in "
            f"{self.spool_dir}. Check LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY; retrying every "
            f"{self.auth_retry_interval:g}s and at the next start."
        )
        if self.stats.paused != message:
            logger.error("celery-langfuse: %s", message)
        self.stats.paused = message
        self.stats.last_error = f"HTTP {status}"
        self._backoff.not_before = time.monotonic() + self.auth_retry_interval

    def _on_retryable(self, result: SendResult) -> None:
        backoff = self._backoff
        backoff.failures += 1
        delay = min(60.0, 0.5 * 2 ** min(backoff.failures - 1, 10))
        delay *= random.uniform(0.5, 1.0)
        if result.retry_after is not None:
            delay = result.retry_after + random.uniform(0.0, 0.25)
        backoff.not_before = time.monotonic() + delay
        what = result.error or f"HTTP {result.status}: {result.body[:200]}"
        self.stats.last_error = what
        kind = result.error.split(":")[0] if result.error else str(result.status)
        if kind not in backoff.reported:
            backoff.reported.add(kind)
            hint = " (check LANGFUSE_BASE_URL)" if result.status in (404, 405) else ""
            logger.warning(
                "celery-langfuse: Langfuse at %s not accepting spans (%s)%s; backing off, "
                "nothing is dropped", self.config.base_url, what, hint,
            )

    # -- attempts, cap, clean-up -------------------------------------------------------------

    def close_attempt(
        self, task_id: str, reason: str, *, level: str = "ERROR", final_state: str = "FAILURE"
    ) -> bool:
        """Write the ERROR observation of a task whose process died; once per task id."""
        with self._close_lock:
            if task_id in self._closed_tasks:
                return True
            self.index.refresh()
            attempt = self.index.find_task(task_id)
            if attempt is None:
                return False
            self._write_closing(attempt, reason, level, final_state)
            self._closed_tasks[task_id] = None
            while len(self._closed_tasks) > 10_000:
                self._closed_tasks.popitem(last=False)
        self.wake()
        return True

    def _write_closing(
        self, attempt: OpenAttempt, reason: str, level: str = "ERROR",
        final_state: str = "FAILURE",
    ) -> None:
        span = closing_span(attempt, reason, level=level, final_state=final_state)
        self.exporter.write(span_frame(span), 1)
        self.index.mark_closed(attempt.span_id)
        self.stats.attempts_closed += 1

    def _close_orphans(self) -> bool:
        orphans = self.index.orphans(self.orphan_grace)
        with self._close_lock:
            for attempt in orphans:
                if attempt.task_id in self._closed_tasks:
                    self.index.mark_closed(attempt.span_id)
                    continue
                self._write_closing(attempt, (
                    "worker lost: the process running this task exited before it finished "
                    "(SIGKILL, OOM kill or crash); its outcome is unknown"
                ))
                self._closed_tasks[attempt.task_id] = None
        return bool(orphans)

    def _enforce_cap(self) -> None:
        excess = self.pending_bytes() - self.config.spool_max_bytes
        if excess <= 0:
            return
        dropped_spans = dropped_bytes = 0
        for path, _ in list_segments(self.spool_dir):
            start = self._cursor(path)
            records = scan_file(path, start).records
            done = [r for r in records if r.end - start <= excess] or records[:1]
            if not done:
                continue
            dropped_spans += sum(1 for r in done if r.kind == KIND_SPAN)
            dropped_bytes += done[-1].end - start
            self._commit([_Item(path, done[-1].end)])
            excess -= done[-1].end - start
            if excess <= 0:
                break
        if not dropped_bytes:
            return
        self.stats.dropped_at_cap += dropped_spans
        logger.warning(
            "celery-langfuse: spool %s exceeded CELERY_LANGFUSE_SPOOL_MAX_BYTES=%d; dropped the "
            "oldest %d span(s) (%d bytes), %d dropped so far. Check that Langfuse is reachable "
            "or raise the cap.", self.spool_dir, self.config.spool_max_bytes, dropped_spans,
            dropped_bytes, self.stats.dropped_at_cap,
        )

    def _delete_finished(self) -> None:
        """Remove segments that are fully done and will never be appended to again."""
        keep = self.index.segments_with_open_attempts()
        for path, segment in list_segments(self.spool_dir):
            if path in keep or not self.index.has_read(path):
                continue
            try:
                if path.stat().st_size > self._cursor(path):
                    continue
                if not (_is_sealed(path) or not writer_alive(segment)):
                    continue
                remove_segment(path)
            except FileNotFoundError:
                pass
            self._cursors.pop(path, None)

    def _write_status(self) -> None:
        status = {**asdict(self.stats), "pid": os.getpid(), "updated_at": time.time(),
                  "base_url": self.config.base_url}
        tmp = self.spool_dir / f".{STATUS_FILE}.{os.getpid()}"
        try:
            tmp.write_text(json.dumps(status))
            os.replace(tmp, self.spool_dir / STATUS_FILE)
        except OSError:
            logger.debug("celery-langfuse: could not write %s", STATUS_FILE, exc_info=True)

"""Open task attempts: how a task whose process died still gets its observation.

When a task starts, the process running it appends a ``KIND_OPEN`` frame to its spool
segment *before* the body runs: task id, trace id, observation (span) id, parent, name,
start time and the attributes the SDK put on the observation (input, metadata, trace
attributes). When the task ends normally, its span is exported into the same segment, and
the span id closes the attempt.

Open-attempt payload (``KIND_OPEN``), one of two forms told apart by the first byte:

* ``{`` — UTF-8 JSON of :class:`OpenAttempt`'s fields (written by celery-langfuse up to
  0.1; still read).
* ``0x02`` — compact, written since: the byte 0x02, then ``marshal.dumps(fields, 4)`` with
  ``fields`` the tuple ``(task_id, name, trace id (32 hex), span id (16 hex), parent span id
  (16 hex) or None, start ns, attributes dict, resource blob, scope blob)``; the two blobs are
  exactly those of the compact span record (``_spanrecord``: fields 15 and 16), so one
  process marshals its resource and scope once for both kinds of record.

If the process dies first (hard time limit, OOM kill, a SIGKILLed worker), no span ever
comes. Then someone else writes it, as ERROR with the reason, **under the same ids**, so the
generations the task already produced hang under it:

- the worker's main process, on ``task_failure`` with ``TimeLimitExceeded`` /
  ``WorkerLostError`` (and ``task_revoked`` with terminate), with Celery's reason;
- otherwise the shipper, once the writer is known dead for a grace period (the main process
  gets the first chance, since its reason is more precise).

A task id can have several executions (a redelivered message, a resent task id), each with
its own observation id. The main process knows only the task id: it closes the newest open
attempt of that task not older than one it already closed; older executions left open are
the shipper's orphans. :meth:`AttemptIndex.executions` counts the executions of a task id
this spool has seen started (how the main process tells a redelivery from a first run).

:class:`AttemptIndex` reads the spool incrementally and keeps only attempts still open, so
its memory is bounded by the tasks in flight, not by the tasks run.
"""

from __future__ import annotations

import collections
import json
import logging
import marshal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tracing.spool import (
    KIND_OPEN,
    KIND_SPAN,
    ScanResult,
    SegmentId,
    encode_frame,
    list_segments,
    scan_file,
    writer_alive,
)
from tracing.spool._drops import read_ledger
from tracing.spool._space import PAGE
from tracing.spool._spanrecord import as_lists, origin_of, resource_blob, scope_blob

logger = logging.getLogger("celery_langfuse")

LEVEL = "langfuse.observation.level"
STATUS_MESSAGE = "langfuse.observation.status_message"
RETRIES = "langfuse.observation.metadata.retries"  # the task's metadata, JSON text: "0"
AttributeValue = Any


@dataclass(frozen=True)
class OpenAttempt:
    """What a task attempt's process wrote when the attempt started."""

    task_id: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_ns: int
    attributes: dict[str, AttributeValue]
    resource: dict[str, AttributeValue] = field(default_factory=dict)
    scope: str = "langfuse-sdk"
    scope_version: str = ""
    scope_attributes: dict[str, AttributeValue] = field(default_factory=dict)

    def frame(self) -> bytes:
        """The JSON form (the compact one is written from a live span: :func:`open_frame`)."""
        return encode_frame(KIND_OPEN, json.dumps(self.__dict__, default=str).encode())

    @classmethod
    def from_payload(cls, payload: bytes) -> OpenAttempt:
        """Either form (see the module docstring); ValueError/TypeError if neither."""
        if payload[:1] != _COMPACT:
            return cls(**json.loads(payload))
        try:
            (task_id, name, trace_id, span_id, parent, start_ns, attributes, resource,
             scope) = marshal.loads(payload[1:])
            resource_attributes, scope_name, scope_version, scope_attributes = origin_of(
                resource, scope)  # decoded once per distinct pair: shared, never changed
        except (EOFError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"undecodable open-attempt record: {exc}") from exc
        return cls(task_id=task_id, name=name, trace_id=trace_id, span_id=span_id,
                   parent_span_id=parent, start_ns=start_ns, attributes=as_lists(attributes),
                   resource=resource_attributes,
                   scope="langfuse-sdk" if scope_name is None else scope_name,
                   scope_version=scope_version, scope_attributes=scope_attributes)


_COMPACT = b"\x02"


def open_frame(task_id: str, span: Any) -> bytes:
    """The compact ``KIND_OPEN`` frame of a live span (the task's observation)."""
    context = span.get_span_context()
    parent = span.parent
    fields = (task_id, span.name, f"{context.trace_id:032x}", f"{context.span_id:016x}",
              f"{parent.span_id:016x}" if parent is not None else None,
              span.start_time or time.time_ns(), dict(span.attributes or {}),
              resource_blob(span.resource), scope_blob(span.instrumentation_scope))
    try:
        return encode_frame(KIND_OPEN, _COMPACT + marshal.dumps(fields, 4))
    except ValueError:  # a value marshal refuses (never an OpenTelemetry-cleaned one)
        return from_span(task_id, span).frame()


def from_span(task_id: str, span: Any) -> OpenAttempt:
    """Record a live SDK span (the task's observation) as an open attempt."""
    context = span.get_span_context()
    parent = span.parent
    scope = span.instrumentation_scope
    return OpenAttempt(
        task_id=task_id,
        name=span.name,
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_span_id=f"{parent.span_id:016x}" if parent is not None else None,
        start_ns=span.start_time or time.time_ns(),
        attributes=as_lists(span.attributes or {}),
        resource=as_lists(span.resource.attributes if span.resource else {}),
        scope=scope.name if scope else "langfuse-sdk",
        scope_version=(scope.version or "") if scope else "",
        scope_attributes=as_lists((scope.attributes or {}) if scope else {}),
    )


def closing_span(
    attempt: OpenAttempt, reason: str, *, level: str = "ERROR", final_state: str = "FAILURE"
) -> ReadableSpan:
    """The task's observation, ended now with ``level`` and ``reason``, under its own ids."""
    trace_id = int(attempt.trace_id, 16)
    context = SpanContext(trace_id, int(attempt.span_id, 16), False, TraceFlags(1))
    parent = (
        SpanContext(trace_id, int(attempt.parent_span_id, 16), True, TraceFlags(1))
        if attempt.parent_span_id else None
    )
    attributes = {**attempt.attributes, LEVEL: level, STATUS_MESSAGE: reason,
                  "langfuse.observation.metadata.final_state": json.dumps(final_state)}
    return ReadableSpan(
        name=attempt.name,
        context=context,
        parent=parent,
        resource=Resource(attempt.resource),
        attributes={k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()},
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, reason) if level == "ERROR" else Status(StatusCode.UNSET),
        start_time=attempt.start_ns,
        end_time=max(time.time_ns(), attempt.start_ns),
        instrumentation_scope=InstrumentationScope(
            attempt.scope, attempt.scope_version or None, None, attempt.scope_attributes
        ),
    )


@dataclass
class _Tracked:
    attempt: OpenAttempt
    segment: Path
    writer: SegmentId
    offset: int = 0  # where its KIND_OPEN record starts in ``segment``
    unreadable: bool = False  # corrupt bytes followed it in its segment


class AttemptIndex:
    """Attempts opened in a spool and not yet closed, read incrementally from the segments."""

    def __init__(self, spool_dir: Path, alive: Callable[[SegmentId], bool] = writer_alive,
                 on_scan: Callable[[Path, SegmentId, int, ScanResult], object] | None = None,
                 ) -> None:
        self.spool_dir, self.alive = spool_dir, alive
        self.on_scan = on_scan  # given each scan (path, segment, start, result): one read
        self._read_to: dict[Path, int] = {}
        self._torn_at: dict[Path, int] = {}  # segments ending in an unfinished record
        self._open: dict[str, _Tracked] = {}
        # When each dead writer was first seen dead. Writers already dead when this index was
        # built count from their last write, so a previous run's orphans close at once; a
        # writer that dies while we run waits out the grace period, which gives the worker's
        # main process (with Celery's precise reason) the first chance to close its attempts.
        self._dead_since: dict[SegmentId, float] = {}
        self._seen_live_pass = False
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._started: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._lock = threading.RLock()

    def refresh(self) -> None:
        """Read what was appended since the last call; close attempts whose span arrived."""
        with self._lock:
            opened: list[_Tracked] = []
            closed: set[str] = set()
            present = set()
            for path, segment in list_segments(self.spool_dir):
                present.add(path)
                self._read_segment(path, segment, opened, closed)
            for gone in set(self._read_to) - present:
                del self._read_to[gone]
                self._torn_at.pop(gone, None)
            for tracked in opened:
                self._open[tracked.attempt.span_id] = tracked
                self._count_started(tracked.attempt)
            for span_id in closed:
                self._forget_open(span_id)

    def _read_segment(
        self, path: Path, segment: SegmentId, opened: list[_Tracked], closed: set[str]
    ) -> None:
        start = self._read_to.get(path, 0)
        try:
            result = scan_file(path, start)
        except FileNotFoundError:
            return
        if self.on_scan is not None:
            self.on_scan(path, segment, start, result)
        for record in result.records:
            if record.kind == KIND_SPAN:
                closed.add(record.payload[:8].hex())
            elif record.kind == KIND_OPEN:
                try:
                    attempt = OpenAttempt.from_payload(record.payload)
                except (ValueError, TypeError):
                    logger.warning("celery-langfuse: unreadable open-attempt record in %s", path)
                    continue
                opened.append(_Tracked(attempt, path, segment, record.offset))
        for first, last in result.corrupt:
            here = [t for t in [*opened, *self._open.values()] if t.segment == path]
            if _punched(path, first, last):
                # Punched out by the shipper (``_space``), whose own index saw every attempt
                # before it closed (it never punches past an open one): closed, not open.
                for tracked in here:
                    if tracked.offset < last:
                        closed.add(tracked.attempt.span_id)
                continue
            # A span written after its attempt opened may be in those bytes: say so when the
            # attempt is closed, rather than blaming its process.
            for tracked in here:
                if tracked.offset < first:
                    tracked.unreadable = True
        if result.torn_tail:
            self._torn_at[path] = result.end  # dropped again if the record completes
        else:
            self._torn_at.pop(path, None)
        self._read_to[path] = result.end

    def keep_from(self, path: Path) -> int:
        """The first byte of ``path`` this index still needs: where its reading stopped, or
        an open attempt's record before that (the main process's index may still look it up).
        Bytes before it may be freed (``tracing.spool._space``)."""
        with self._lock:
            needed = [t.offset for t in self._open.values() if t.segment == path]
            return min([self._read_to.get(path, 0), *needed])

    def why_open(self, span_id: str) -> str | None:
        """What is known about why an attempt never closed: None, ``"unreadable"`` (corrupt
        bytes followed its start record) or ``"cut"`` (its segment ends in an unfinished
        record after it)."""
        with self._lock:
            tracked = self._open.get(span_id)
            if tracked is None:
                return None
            if tracked.unreadable:
                return "unreadable"
            torn = self._torn_at.get(tracked.segment)
            return "cut" if torn is not None and tracked.offset < torn else None

    def writer_of(self, span_id: str) -> str | None:
        """The writer id of the segment an open attempt was read from (None if unknown)."""
        with self._lock:
            tracked = self._open.get(span_id)
            return (tracked.writer.writer or None) if tracked is not None else None

    def has_read(self, path: Path) -> bool:
        """True once every whole record of ``path`` has been read into the index."""
        with self._lock:
            try:
                return not scan_file(path, self._read_to.get(path, 0)).records
            except FileNotFoundError:
                return True

    def _count_started(self, attempt: OpenAttempt) -> None:
        key = (attempt.task_id, str(attempt.attributes.get(RETRIES, "0")))
        self._started[key] = self._started.pop(key, 0) + 1
        while len(self._started) > 10_000:
            self._started.popitem(last=False)

    def executions(self, task_id: str, retries: int = 0) -> int:
        """How many executions of the message (``task_id``, ``retries``) this spool has seen
        start: open-attempt records read, including any appended since the last read."""
        with self._lock:
            self.refresh()
            return self._started.get((task_id, str(retries)), 0)

    def find_task(self, task_id: str, started_after: int = -1) -> OpenAttempt | None:
        """The newest open attempt of ``task_id`` that started after ``started_after`` (ns)."""
        with self._lock:
            found = [tracked.attempt for tracked in self._open.values()
                     if tracked.attempt.task_id == task_id
                     and tracked.attempt.start_ns > started_after]
        return max(found, key=lambda attempt: attempt.start_ns) if found else None

    def mark_closed(self, span_id: str) -> None:
        with self._lock:
            self._forget_open(span_id)

    def was_closed(self, task_id: str) -> bool:
        """True if an attempt of ``task_id`` seen open here was closed since (by its own
        span or by another process's closing record)."""
        with self._lock:
            return task_id in self._closed

    def _forget_open(self, span_id: str) -> None:
        tracked = self._open.pop(span_id, None)
        if tracked is not None:
            self._closed[tracked.attempt.task_id] = None
            while len(self._closed) > 10_000:
                self._closed.popitem(last=False)

    def orphans(self, dead_for: float, now: float | None = None) -> list[OpenAttempt]:
        """Open attempts whose writing process has been dead at least ``dead_for`` seconds."""
        now = time.time() if now is None else now
        with self._lock:
            tracked = list(self._open.values())
            found = self._orphans_among(tracked, dead_for, now)
            self._seen_live_pass = True
            writers = {item.writer for item in tracked}
            self._dead_since = {w: t for w, t in self._dead_since.items() if w in writers}
            return found

    def _orphans_among(
        self, tracked: list[_Tracked], dead_for: float, now: float
    ) -> list[OpenAttempt]:
        found = []
        for item in tracked:
            dead_since = self._dead_since_for(item, now)
            if dead_since is not None and now - dead_since >= dead_for:
                found.append(item.attempt)
        return found

    def _dead_since_for(self, item: _Tracked, now: float) -> float | None:
        if item.writer in self._dead_since:
            return self._dead_since[item.writer]
        if self.alive(item.writer):
            return None
        since = now
        if not self._seen_live_pass:
            try:
                since = item.segment.stat().st_mtime
            except FileNotFoundError:
                since = 0.0
        self._dead_since[item.writer] = since
        return since

    def segments_with_open_attempts(self) -> set[Path]:
        with self._lock:
            return {tracked.segment for tracked in self._open.values()}

    def open_attempts(self) -> Iterable[OpenAttempt]:
        with self._lock:
            return [tracked.attempt for tracked in self._open.values()]


def _punched(path: Path, first: int, last: int) -> bool:
    """True if unreadable bytes ``[first, last)`` of ``path`` start in a punched hole: zeros
    up to the next page boundary (holes are whole pages from the start of the file; the
    record they cut may go on after them)."""
    end = min(last, (first // PAGE + 1) * PAGE)
    try:
        with path.open("rb") as handle:
            handle.seek(first)
            chunk = handle.read(end - first)
    except OSError:
        return False
    return len(chunk) == end - first and not chunk.strip(b"\x00")


WORKER_LOST = (
    "worker lost: the process running this task exited before it finished "
    "(SIGKILL, OOM kill or crash); its outcome is unknown"
)
SPAN_UNREADABLE = (
    "span record unreadable: the spool holds corrupt bytes after this attempt's start record, "
    "where its span was most likely written (set aside in dead-letter/); its outcome is unknown"
)
SPAN_CUT = (
    "span record unreadable: its segment ends in a record cut short after this attempt's start "
    "record (its process died while writing, most likely this span); its outcome is unknown"
)
SPAN_NOT_STORED = (
    "span record not stored: the process running this task could not write {count} span(s) "
    "to the spool ({causes}); its outcome is unknown"
)


def orphan_reason(index: AttemptIndex, attempt: OpenAttempt, spool_dir: Path) -> str:
    """Why ``attempt``'s process left it open, as far as the spool can tell (never a guess
    dressed up as a cause): its span was in corrupt bytes, its process could not store spans
    (the drop ledger names it), or else the process died before the task ended."""
    why = index.why_open(attempt.span_id)
    if why is not None:
        return SPAN_UNREADABLE if why == "unreadable" else SPAN_CUT
    writer = index.writer_of(attempt.span_id)
    if writer:
        drops = {cause: n for (who, cause), n in read_ledger(spool_dir).items() if who == writer}
        if drops:
            causes = ", ".join(f"{cause}: {n}" for cause, n in sorted(drops.items()))
            return SPAN_NOT_STORED.format(count=sum(drops.values()), causes=causes)
    return WORKER_LOST


class AttemptCloser:
    """Writes the closing observation of attempts whose process died, once per attempt.

    ``write`` appends one ready frame to the spool (the process's own exporter), so whoever
    calls :meth:`close` — the main process on Celery's signal, or the shipper for orphans —
    only writes a local record; the shipper ships it like any other span.
    """

    def __init__(self, index: AttemptIndex, write: Callable[[bytes], object]) -> None:
        self.index = index
        self.write = write
        self.closed_count = 0
        # Per task id, the start (ns) of the last attempt ``close`` closed: Celery signals a
        # hard time limit twice, and the second signal must not close an older execution.
        self._closed_tasks: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._closed_spans: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def close(
        self, task_id: str, reason: str, *, level: str = "ERROR", final_state: str = "FAILURE"
    ) -> bool:
        """Close ``task_id``'s newest open attempt; False if the spool holds none for it."""
        with self._lock:
            self.index.refresh()
            attempt = self.index.find_task(task_id, self._closed_tasks.get(task_id, -1))
            if attempt is None:
                # Already closed (here, or by another process, e.g. the shipper after the
                # grace period) counts as closed: no second observation for it.
                return task_id in self._closed_tasks or self.index.was_closed(task_id)
            self._write_closing(attempt, reason, level, final_state)
        return True

    def close_orphans(self, dead_for: float) -> bool:
        """Close attempts whose writer has been dead ``dead_for`` s; True if there were any."""
        orphans = self.index.orphans(dead_for)
        with self._lock:
            for attempt in orphans:
                if attempt.span_id in self._closed_spans:
                    self.index.mark_closed(attempt.span_id)
                    continue
                reason = orphan_reason(self.index, attempt, self.index.spool_dir)
                self._write_closing(attempt, reason, "ERROR", "FAILURE")
        return bool(orphans)

    def _write_closing(
        self, attempt: OpenAttempt, reason: str, level: str, final_state: str
    ) -> None:
        from tracing.spool._exporter import span_frame

        self.write(span_frame(closing_span(attempt, reason, level=level,
                                           final_state=final_state)))
        self.index.mark_closed(attempt.span_id)
        self.closed_count += 1
        self._closed_tasks[attempt.task_id] = max(
            attempt.start_ns, self._closed_tasks.pop(attempt.task_id, -1))
        self._closed_spans[attempt.span_id] = None
        for seen in (self._closed_tasks, self._closed_spans):
            while len(seen) > 10_000:
                seen.popitem(last=False)

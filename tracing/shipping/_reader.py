"""Reading the spool for the shipper: cursors, windows, corrupt and torn records, cap, clean-up.

Built on ``_spool``'s framing (``scan_file``), names (``list_segments``), cursors and dead
letters; the one question about a writer it asks is ``alive(segment)`` (``_spool.writer_alive``
unless the caller passes another), so liveness is one seam.

* **Cursors**: each segment's committed offset, read (and its fixed-size file reserved) when
  the segment is first seen, then kept in memory; ``commit`` moves them forward only, in
  memory first and then on disk in place (``write_cursor``), so a failed write (full disk)
  never makes a delivered record look undelivered to this shipper.
* **Space**: ``free_space`` punches the shipped prefix of each segment out of the disk
  (``tracing.spool._space``) as soon as its cursor is written.
* **Windows**: a segment is read about one batch's worth of bytes at a time, never whole, and
  what a window holds beyond the batch is kept for the next one, so each record is scanned
  once (re-scanning windows per batch cost half the shipper's time); a window holding no
  whole record (one huge record) is widened.
* **Corrupt bytes** (bad checksum) go to ``dead-letter/`` and are counted, with the span
  records they held (``unreadable_spans``); a **torn tail** (the last record, unfinished) is
  cut and counted only when its writer is dead and the window reached the end of the file.
* **Cap**: past ``max_bytes`` unshipped, the oldest records are skipped, counted and logged.
* **Clean-up**: a finished (sealed, or writer dead), fully shipped segment is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tracing.shipping._status import ShipperStats
from tracing.spool import (
    KIND_DROPPED,
    KIND_SCORE,
    KIND_SEAL,
    KIND_SPAN,
    ScanResult,
    SegmentId,
    encode_frame,
    list_segments,
    read_cursor,
    remove_segment,
    scan_file,
    write_cursor,
    write_dead_letter,
    writer_alive,
)
from tracing.spool._cursors import reserve_cursor
from tracing.spool._format import lost_records
from tracing.spool._space import punch_prefix, punchable

logger = logging.getLogger("celery_langfuse")

WINDOW_SLACK = 256 * 1024  # read past a full batch, so the record ending it is whole
_SEAL = encode_frame(KIND_SEAL, b"")
_SHIPPED = (KIND_SPAN, KIND_SCORE)  # the kinds whose payload is sent to Langfuse


@dataclass
class Item:
    """A run of spool bytes that becomes done together: one span or score record (``kind``), or
    bytes to skip (payload None)."""

    path: Path
    end: int
    payload: bytes | None = None
    kind: int = KIND_SPAN


@dataclass(frozen=True)
class Pending:
    """Records after their segments' cursors: not yet delivered."""

    spans: int = 0
    scores: int = 0


def count_pending(spool_dir: Path, cursor: Callable[[Path], int] = read_cursor) -> Pending:
    """Count the undelivered span and score records of a spool (reads what is unshipped).

    ``cursor``: where each segment's undelivered part starts (the files' cursors, or a
    shipper's own view, which is newer if a cursor could not be written)."""
    spans = scores = 0
    for path, _ in list_segments(spool_dir):
        try:
            records = scan_file(path, cursor(path)).records
        except FileNotFoundError:
            continue
        spans += sum(1 for r in records if r.kind == KIND_SPAN)
        scores += sum(1 for r in records if r.kind == KIND_SCORE)
    return Pending(spans, scores)


def is_sealed(path: Path) -> bool:
    """True if the segment ends in the seal frame: its writer will never append again."""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - len(_SEAL)))
        return handle.read() == _SEAL


class SpoolReader:
    """The shipper's view of one spool directory."""

    def __init__(
        self, spool_dir: Path, stats: ShipperStats, *, batch_max_spans: int = 1000,
        batch_max_bytes: int = 3 * 1024 * 1024,
        alive: Callable[[SegmentId], bool] = writer_alive,
    ) -> None:
        self.spool_dir = spool_dir
        self.stats = stats
        self.batch_max_spans = batch_max_spans
        self.batch_max_bytes = batch_max_bytes
        self.alive = alive
        self.pending = 0  # unshipped bytes as of the last ``pending_bytes`` call
        self._cursors: dict[Path, int] = {}
        self._durable: dict[Path, int] = {}  # cursors as last written to disk
        self._punched: dict[Path, int] = {}  # bytes freed at the start of each segment
        self._cursor_errors: set[str] = set()
        self.reported_drops: dict[str, int] = {}  # KIND_DROPPED records, by cause
        self._ahead: dict[Path, list[Item]] = {}  # read, not yet done, in file order
        self._scanned: dict[Path, int] = {}  # where reading ahead stopped

    def cursor(self, path: Path) -> int:
        """``path``'s cursor; the first time, read from disk and its file reserved."""
        if path not in self._cursors:
            try:
                self._cursors[path] = reserve_cursor(path)
                self._durable[path] = self._cursors[path]
            except FileNotFoundError:
                self._cursors[path] = 0  # the segment is gone, or going
            except OSError as exc:  # no room to reserve it: written when there is
                self._cursors[path] = read_cursor(path)
                self._cursor_failed(path, exc)
        return self._cursors[path]

    def commit(self, items: Iterable[Item]) -> None:
        """Mark ``items`` done: each segment's cursor moves to the furthest end among them.

        In memory first (this shipper never resends them, whatever the disk says), then on
        disk; a cursor that cannot be written is logged and counted, never raised: the send
        succeeded, and raising would resend it.
        """
        ends: dict[Path, int] = {}
        for item in items:
            ends[item.path] = max(ends.get(item.path, 0), item.end)
        moved = [(path, end) for path, end in ends.items() if end > self.cursor(path)]
        for path, end in moved:
            self._cursors[path] = end
        for path, end in moved:
            self._persist(path, end)

    def _persist(self, path: Path, end: int) -> None:
        try:
            write_cursor(path, end)
        except FileNotFoundError:
            return  # the segment was removed under us: nothing left to resend
        except OSError as exc:
            self._cursor_failed(path, exc)
            return
        self._durable[path] = end

    def _cursor_failed(self, path: Path, exc: OSError) -> None:
        self.stats.cursor_write_failures += 1
        kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        if kind not in self._cursor_errors:
            self._cursor_errors.add(kind)
            logger.error(
                "celery-langfuse: cannot write the shipping cursor of %s (%s); progress is "
                "kept in memory, so nothing is resent while this shipper runs, but a restart "
                "would resend those records. Free space in %s.", path.name, exc, self.spool_dir)

    def free_space(self, keep_from: Callable[[Path], int]) -> int:
        """Punch out the shipped prefix of segments whose cursor is on disk, up to
        ``keep_from(path)`` (the first byte the attempt index still needs); bytes freed."""
        freed = 0
        for path, durable in list(self._durable.items()):
            end = punchable(min(durable, keep_from(path)))
            if end > self._punched.get(path, 0) and punch_prefix(path, end):
                freed += end - self._punched.get(path, 0)
                self._punched[path] = end
        return freed

    def pending_bytes(self) -> int:
        """Unshipped bytes over all segments (stats every segment; kept in ``pending``)."""
        total = 0
        for path, _ in list_segments(self.spool_dir):
            try:
                total += max(0, path.stat().st_size - self.cursor(path))
            except FileNotFoundError:
                continue
        self.pending = total
        return total

    # -- batches -----------------------------------------------------------------------------

    def next_batch(self) -> tuple[list[Item], bool]:
        """The next records to send, oldest segment first, and whether they fill a batch."""
        items: list[Item] = []
        spans = size = 0
        segments = list_segments(self.spool_dir)
        for gone in set(self._ahead) - {path for path, _ in segments}:
            self.forget(gone)
        for path, segment in segments:
            for item in self._items(path, segment):
                items.append(item)
                if item.payload is not None:
                    spans += 1
                    size += len(item.payload)
                if spans >= self.batch_max_spans or size >= self.batch_max_bytes:
                    return items, True
        return items, False

    def _items(self, path: Path, segment: SegmentId) -> Iterator[Item]:
        """Items of ``path`` after its cursor: those read ahead last time, then new windows.

        What a window holds beyond a full batch is kept for the next batch, so every record
        is scanned (checksummed) once, not once per batch.
        """
        cursor = self.cursor(path)
        ahead = self._ahead.setdefault(path, [])
        if ahead and ahead[0].end <= cursor:
            ahead[:] = [item for item in ahead if item.end > cursor]
        yield from list(ahead)
        while True:
            fresh = self._read_more(path, segment)
            if not fresh:
                return
            yield from fresh

    def _read_more(self, path: Path, segment: SegmentId) -> list[Item]:
        start = max(self.cursor(path), self._scanned.get(path, 0))
        try:
            size = path.stat().st_size
            if size <= start:
                return []
            result, cut_by_window = self._scan_window(path, start, size)
        except FileNotFoundError:
            return []
        return self._take(path, segment, result, cut_by_window)

    def offer(self, path: Path, segment: SegmentId, start: int, result: ScanResult) -> bool:
        """Take another reader's scan of ``path`` from ``start`` (the attempt index reads
        every segment to its end each cycle), from where this reader's reading stopped, if
        it is no larger than one window: those records are then not read and checksummed a
        second time. True if anything was taken."""
        if result.end - start > self.batch_max_bytes + WINDOW_SLACK:
            return False  # a backlog: read in windows, as the batches need them
        here = max(self.cursor(path), self._scanned.get(path, 0))
        if result.end <= here or start > here:
            return False
        if start < here:  # read partly already: the rest, if ``here`` starts a record
            if not any(r.offset == here for r in result.records) and not any(
                    first == here for first, _ in result.corrupt):
                return False
            result = ScanResult([r for r in result.records if r.offset >= here],
                                [c for c in result.corrupt if c[0] >= here],
                                result.end, result.torn_tail)
        with contextlib.suppress(FileNotFoundError):  # gone: its torn tail cannot be cut
            self._take(path, segment, result, False)
        return True

    def _take(self, path: Path, segment: SegmentId, result: ScanResult,
              cut_by_window: bool) -> list[Item]:
        """Items of a scan of ``path``, kept ahead; dropped-span reports counted, corrupt
        ranges set aside, a dead writer's torn tail cut."""
        items = [Item(path, r.end, r.payload if r.kind in _SHIPPED else None, r.kind)
                 for r in result.records]
        for record in result.records:
            if record.kind == KIND_DROPPED:
                self._count_dropped(path, record.payload)
        for first, last in result.corrupt:
            self._set_aside_corrupt(path, first, last)
            items.append(Item(path, last))
        if result.corrupt:
            items.sort(key=lambda item: item.end)
        if result.torn_tail and not cut_by_window and not self.alive(segment):
            items.append(self._cut_torn_tail(path, result.end))
        if items:
            self._scanned[path] = items[-1].end
            self._ahead.setdefault(path, []).extend(items)
        return items

    def _count_dropped(self, path: Path, payload: bytes) -> None:
        """A writer's report of spans it dropped before the spool: counted by cause, and one
        log line the first time a cause is seen."""
        try:
            report = json.loads(payload)
            cause, count = str(report["cause"]), int(report["count"])
        except (ValueError, KeyError, TypeError):
            logger.warning("celery-langfuse: unreadable dropped-spans record in %s", path)
            return
        counts = self.reported_drops
        if cause not in counts:
            logger.error("celery-langfuse: a process writing to %s dropped %d span(s) before "
                         "they reached the spool (%s); counted in `python -m tracing status`",
                         self.spool_dir, count, cause)
        counts[cause] = counts.get(cause, 0) + count

    def forget(self, path: Path) -> None:
        """Drop what is kept about a segment that is gone."""
        self._ahead.pop(path, None)
        self._scanned.pop(path, None)
        self._cursors.pop(path, None)
        self._durable.pop(path, None)
        self._punched.pop(path, None)

    def _scan_window(self, path: Path, start: int, size: int) -> tuple[ScanResult, bool]:
        window = self.batch_max_bytes + WINDOW_SLACK
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
        if not raw.strip(b"\x00"):
            return  # a punched hole (read only when a cursor was lost): nothing was there
        spans = lost_records(raw).get(KIND_SPAN, 0)
        self.stats.corrupt_records += 1
        self.stats.unreadable_spans += spans
        where = f"{self.spool_dir}/dead-letter"
        try:
            write_dead_letter(self.spool_dir, [raw],
                              f"corrupt bytes {first}-{last} of {path.name}")
        except OSError as exc:
            where = f"nowhere ({exc})"
        logger.warning(
            "celery-langfuse: %d corrupt bytes at offset %d of %s (bad checksum), holding %d "
            "span record(s) that cannot be read, set aside in %s; the records around them "
            "are shipped", last - first, first, path.name, spans, where,
        )

    def _cut_torn_tail(self, path: Path, end: int) -> Item:
        size = path.stat().st_size
        with path.open("rb") as handle:
            handle.seek(end)
            spans = lost_records(handle.read(size - end)).get(KIND_SPAN, 0)
        self.stats.torn_tails += 1
        self.stats.unreadable_spans += spans
        logger.warning(
            "celery-langfuse: %s ends in %d bytes of a record its writer never finished (it "
            "died mid-write, or a full disk cut the write short), %d span record(s); they are "
            "skipped", path.name, size - end, spans,
        )
        return Item(path, size)


# -- cap and clean-up --------------------------------------------------------------------

def enforce_cap(reader: SpoolReader, max_bytes: int) -> None:
    """Past ``max_bytes`` unshipped, skip the oldest records; count and log them."""
    excess = reader.pending_bytes() - max_bytes
    if excess <= 0:
        return
    dropped_spans = dropped_bytes = 0
    for path, _ in list_segments(reader.spool_dir):
        start = reader.cursor(path)
        records = scan_file(path, start).records
        done = [r for r in records if r.end - start <= excess] or records[:1]
        if not done:
            continue
        dropped_spans += sum(1 for r in done if r.kind == KIND_SPAN)
        dropped_bytes += done[-1].end - start
        reader.commit([Item(path, done[-1].end)])
        excess -= done[-1].end - start
        if excess <= 0:
            break
    reader.pending -= dropped_bytes
    if not dropped_bytes:
        return
    reader.stats.dropped_at_cap += dropped_spans
    logger.warning(
        "celery-langfuse: spool %s exceeded CELERY_LANGFUSE_SPOOL_MAX_BYTES=%d; dropped the "
        "oldest %d span(s) (%d bytes), %d dropped so far. Check that Langfuse is reachable "
        "or raise the cap.", reader.spool_dir, max_bytes, dropped_spans, dropped_bytes,
        reader.stats.dropped_at_cap,
    )


def delete_finished(
    reader: SpoolReader, keep: set[Path], has_read: Callable[[Path], bool]
) -> None:
    """Remove segments fully done that will never grow (sealed, or their writer dead).

    ``keep``: segments still holding open attempts; ``has_read``: whether the attempt
    index has read a segment to its end (so it never misses an open attempt in it).
    """
    for path, segment in list_segments(reader.spool_dir):
        if path in keep or not has_read(path):
            continue
        try:
            if path.stat().st_size > reader.cursor(path):
                continue
            if not (is_sealed(path) or not reader.alive(segment)):
                continue
            remove_segment(path)
        except FileNotFoundError:
            pass
        reader.forget(path)

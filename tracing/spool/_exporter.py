"""The spool exporter: where spans leave process memory, as local writes instead of network.

The Langfuse SDK keeps creating spans and batching them in OpenTelemetry's
``BatchSpanProcessor``; this exporter is handed to the SDK as its ``span_exporter``, so every
batch the processor exports is appended to this process's spool segment: one
``KIND_SPAN`` frame per span, in the compact form of ``_spanrecord`` (the span's fields,
prefixed with the span and trace ids so the shipper can batch, split and de-duplicate without
decoding; the shipper turns it into OTLP at send time), all frames of a batch in one
``os.write``.

A failed write (full disk, unwritable directory) never propagates into the task: the spans
are counted as dropped, by cause, in the spool's drop ledger (``_drops``: updated in place,
so a full disk cannot stop the count; the shipper reports it), and one log line per kind of
error says what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracing.spool import SegmentWriter
from tracing.spool._drops import DISK_FULL, UNENCODABLE, WRITE_FAILED, record_drops
from tracing.spool._spanrecord import span_record

logger = logging.getLogger("celery_langfuse")


def span_frame(span: ReadableSpan) -> bytes:
    """One spool frame holding ``span`` (a compact ``KIND_SPAN`` record)."""
    return span_record(span)


class SpoolExporter(SpanExporter):
    """An OpenTelemetry span exporter that appends spans to the local spool."""

    def __init__(self, writer: SegmentWriter) -> None:
        self.writer = writer
        self.dropped_spans = 0
        self._unrecorded: dict[str, int] = {}  # counted here, not yet in the ledger
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            frames = b"".join(span_frame(span) for span in spans)
        except Exception:
            logger.exception("celery-langfuse: could not encode %d span(s); dropped", len(spans))
            self._count_dropped(len(spans), UNENCODABLE)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if self.write(frames, len(spans)) else (
            SpanExportResult.FAILURE
        )

    def write(self, frames: bytes, span_count: int) -> bool:
        """Append ready frames; on failure count and log, never raise."""
        try:
            self.writer.append(frames)
            return True
        except Exception as exc:
            full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            self._count_dropped(span_count, DISK_FULL if full else WRITE_FAILED)
            self._report_once(exc)
            return False

    def _count_dropped(self, count: int, cause: str) -> None:
        """Count ``count`` spans lost for ``cause``, here and in the spool's drop ledger (what
        the ledger could not take yet is retried with the next drop)."""
        if count <= 0:
            return
        with self._lock:
            self.dropped_spans += count
            self._unrecorded[cause] = self._unrecorded.get(cause, 0) + count
            if record_drops(self.writer.spool_dir, self.writer.writer_id, self._unrecorded):
                self._unrecorded.clear()

    def _report_once(self, exc: Exception) -> None:
        kind = f"{type(exc).__name__}:{getattr(exc, 'errno', '')}"
        if kind in self._reported:
            return
        self._reported.add(kind)
        logger.error(
            "celery-langfuse: cannot write to the trace spool %s (%s); tracing records are "
            "being dropped (%d span(s) so far in process %d; every process's drops are counted "
            "by cause in `python -m tracing status`) but tasks keep running. Free disk space "
            "or point CELERY_LANGFUSE_SPOOL_DIR at a writable directory.",
            self.writer.spool_dir, exc, self.dropped_spans, os.getpid(),
        )

    def shutdown(self) -> None:
        """Nothing to release: the writer outlives SDK shutdowns."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

"""The spool: where spans, scores and open attempts wait on local disk between a task and Langfuse.

A span's path: the Celery side (``tracing.instrumentation``) writes records here; shipping
(``tracing.shipping``) reads them and sends them to Langfuse. The on-disk format is specified
once, in ``tracing.spool._format``'s docstring; the modules follow its sections:

* ``_format``: directory layout, record framing, scanning (the spec itself);
* ``_segments``: spool directories, segment names, writer locks and liveness;
* ``_writer``: ``SegmentWriter``, the one way records are appended;
* ``_cursors``: the shipper's side: cursors, removal, ``ShipperLock``, dead letters;
* the record kinds' payloads: ``_spanrecord`` (spans), ``_score_record`` (scores),
  ``_attempts`` (open task attempts); ``_exporter`` is the OpenTelemetry exporter that
  writes span records.

Everything listed in ``__all__`` is the storage API the two sides share.
"""

from __future__ import annotations

from tracing.spool._cursors import (
    DeadLetter,
    ShipperLock,
    cursor_path,
    read_cursor,
    read_dead_letters,
    remove_dead_letter,
    remove_segment,
    spool_size,
    write_cursor,
    write_dead_letter,
)
from tracing.spool._format import (
    CURSOR_SUFFIX,
    DEAD_LETTER_NAME,
    DEFAULT_MAX_SEGMENT_BYTES,
    HEADER_SIZE,
    KIND_DROPPED,
    KIND_OPEN,
    KIND_SCORE,
    KIND_SEAL,
    KIND_SPAN,
    LOCK_NAME,
    MAGIC,
    MAX_PAYLOAD,
    Record,
    ScanResult,
    SpoolError,
    encode_frame,
    scan,
    scan_file,
    span_payload,
    split_span_payload,
    write_all_at,
)
from tracing.spool._segments import (
    SegmentId,
    dead_letter_dir,
    default_spool_dir,
    ensure_spool_dir,
    list_segments,
    parse_segment_name,
    process_start_time,
    segment_name,
    sweep_writer_locks,
    take_writer_lock,
    writer_alive,
    writer_lock_held,
    writer_lock_name,
    writer_segment_name,
)
from tracing.spool._writer import (
    SegmentWriter,
)

__all__ = [
    "CURSOR_SUFFIX",
    "DEAD_LETTER_NAME",
    "DEFAULT_MAX_SEGMENT_BYTES",
    "HEADER_SIZE",
    "KIND_DROPPED",
    "KIND_OPEN",
    "KIND_SCORE",
    "KIND_SEAL",
    "KIND_SPAN",
    "LOCK_NAME",
    "MAGIC",
    "MAX_PAYLOAD",
    "DeadLetter",
    "Record",
    "ScanResult",
    "SegmentId",
    "SegmentWriter",
    "ShipperLock",
    "SpoolError",
    "cursor_path",
    "dead_letter_dir",
    "default_spool_dir",
    "encode_frame",
    "ensure_spool_dir",
    "list_segments",
    "parse_segment_name",
    "process_start_time",
    "read_cursor",
    "read_dead_letters",
    "remove_dead_letter",
    "remove_segment",
    "scan",
    "scan_file",
    "segment_name",
    "span_payload",
    "split_span_payload",
    "spool_size",
    "sweep_writer_locks",
    "take_writer_lock",
    "write_all_at",
    "write_cursor",
    "write_dead_letter",
    "writer_alive",
    "writer_lock_held",
    "writer_lock_name",
    "writer_segment_name",
]

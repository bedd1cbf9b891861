"""The durable on-disk spool: where spans wait between a task's end and Langfuse.

This module is the storage layer only (no network, stdlib only). Writers are every process that
produces spans (pool children, a solo worker, the main process); the reader is the one shipper
per spool (see ``ShipperLock``). Everything below is the contract between them.

Directory layout
----------------
::

    {spool_dir}/                              0700, created with its parents on first use
        seg-w{writer}-{pid}-{seq:06d}.spool       segments: append-only record logs, 0600
        seg-....spool.cursor                      shipper's committed offset in that segment
        dropped.ledger                            spans writers could not store, by cause
        shipper-status.json                       the shipper's counters (fixed size, padded)
        writer-{writer}.lock                      flock()ed (LOCK_EX) by its live writer, 0600
        .writer-{writer}.lock.tmp                 the same, for the instant before its rename
        shipper.lock                              flock()ed by the one running shipper
        dead-letter/                              0700, created when first needed
            dl-{time_ns}-{pid}-{n}.spool          records Langfuse refused (same framing)
            dl-{time_ns}-{pid}-{n}.reason.json    why: {"reason", "time", "time_iso", "count"}

A segment is named after the writer that appends to it. ``writer`` is 16 lowercase hex digits
from ``os.urandom``, drawn when a ``SegmentWriter`` opens its first segment (a forked child draws
its own), so names cannot collide between processes, pid namespaces (containers) or hosts
sharing the directory; ``pid`` is the writer's pid in its own namespace, for humans only;
``seq`` grows monotonically within a process. Earlier versions named segments
``seg-{pid}-{starttime}-{seq:06d}.spool`` (``starttime``: ``/proc/{pid}/stat`` field 22): such
segments are still listed, adopted and shipped, with the liveness rule they were written for.

Liveness
--------
A writer is *alive* while it holds an exclusive ``flock`` on ``writer-{writer}.lock``; nothing
else (no pid) decides. The writer creates and locks the file under its temporary name and then
renames it into place, before creating its first segment, so no reader ever sees the lock file of
a live writer unlocked. It keeps the descriptor open for as long as it may append (until the
``SegmentWriter`` is garbage-collected or its process ends); the kernel releases the lock when
the process dies, however it dies (SIGKILL, ``os._exit``, OOM kill) and in whatever pid
namespace. ``writer_alive(segment)`` is the one liveness test (the shipper and the attempt index
ask nothing else): it opens the lock file and tries a non-blocking ``LOCK_SH``. Refused: alive.
Granted, or no lock file: dead. Any other error: alive (never cut or delete what may still be
written). A forked child *closes* its inherited copy of the parent's lock descriptor (``LOCK_UN``
would release the lock the two share) and takes a lock of its own on its first write; a child
forked at C level without Python's at-fork hooks keeps the parent looking alive until it
writes or exits. A writer whose lock file was deleted under it (the directory cleaned up)
notices at its next segment and takes a new id. ``remove_segment`` removes a dead writer's lock
file along with any of its segments (a dead writer's lock file and no lock file both read as
dead); ``sweep_writer_locks`` (run when a shipper takes the spool) removes strays.

Legacy ``seg-{pid}-{starttime}-...`` segments are alive while ``/proc/{pid}/stat`` shows the
same start time and no zombie (``kill(pid, 0)`` without /proc), which means something only in
the pid namespace that wrote them: do not share one spool between containers running an
earlier version and this one.

A spool directory may be shared by several containers (pid namespaces) on one host, through a
local filesystem they all mount (a bind mount or a local volume): ``flock`` works between them.
It must not be shared between hosts (flock over NFS is emulated per client, so liveness and the
one-shipper rule would fail silently). Files are 0600, so every writer sharing a spool must run
as the same user as its shipper.

Record framing
--------------
Each record is one frame, all integers little-endian::

    offset  size  field
    0       2     MAGIC  b"\\xc5\\x1f"
    2       1     kind   KIND_SPAN=1, KIND_OPEN=2, KIND_DROPPED=3, KIND_SEAL=4,
                         KIND_SCORE=5
    3       4     length of payload (<= MAX_PAYLOAD; larger means corruption)
    7       4     crc32 over bytes 2..7 (kind + length) followed by the payload
    11      n     payload

* ``KIND_SPAN``: 8-byte span id + 16-byte trace id + the span's body (``span_payload``): a
  compact record of its fields (first byte 0x02), or, as written by version 0.1, a serialized
  OTLP ``ExportTraceServiceRequest`` holding exactly that one span (first byte 0x0A); the
  body's format is specified in ``_spanrecord``.
* ``KIND_OPEN``: a task attempt that has started (so the shipper can close it as ERROR if its
  process dies before the task ends): a compact marshal record (first byte 0x02) or, as
  written up to 0.1, UTF-8 JSON; both are specified in ``_attempts``.
* ``KIND_DROPPED``: UTF-8 JSON ``{"cause": str, "count": int}``: a writer's report that it
  dropped ``count`` spans before they reached the spool (``sdk_queue_full``: OpenTelemetry's
  span queue overflowed). The shipper adds the counts to its status by cause.
* ``KIND_SCORE``: UTF-8 JSON, one Langfuse ingestion event exactly as the shipper sends it in
  the ``batch`` of ``POST /api/public/ingestion`` (``_score_record``)::

      {"id": "<event id: 32 hex, drawn once at the call>", "type": "score-create",
       "timestamp": "<RFC 3339 UTC>", "body": {"id": "<score id>", "traceId": "<32 hex>",
       "observationId": "<16 hex, optional>", "name": "...", "value": 0.8 | "text" | 0/1,
       "dataType": "NUMERIC" | "CATEGORICAL" | "BOOLEAN", "comment": "...", ...}}

  A run-level score of an experiment has ``"datasetRunId": "<experiment id>"`` instead of
  ``traceId``; ``configId`` names a Langfuse score config when the caller gave one.

  The score id is the caller's, or derived from the target and name, so a resend is an upsert
  in Langfuse, never a second score; the event id, unique per record, keys the per-event
  result of Langfuse's 207 answer. Score records are written to segments of their own (one
  ``SegmentWriter`` per process for scores): a segment never mixes scores and spans, so each
  kind's cursor moves on its own answers.
* ``KIND_SEAL``: empty payload; the writer appends it as the last frame of a segment it will
  never write again (rotation, ``close()``). A segment is *finished* when it is sealed or its
  writer is dead (``writer_alive``); only a finished segment may be deleted once shipped,
  and only a finished segment's torn tail is garbage. Sealing is what lets a long-lived process's
  rotated segments be reclaimed while it still runs, even with several writers in one process.

Readers ship ``KIND_SPAN`` and ``KIND_SCORE``, handle ``KIND_OPEN``, and skip every other kind.

Scanning (``scan`` / ``scan_file``) walks frames from an offset. A frame is accepted only if its
magic, length and crc are all right. Fewer bytes than a header, or a payload running past the end
of the data, is a *tail*: possibly a frame still being written (a reader can see a concurrent
``write`` half done), so it is reported (``torn_tail``) and left alone; ``ScanResult.end`` stops
before it and the next scan resumes there. Anything else wrong - bad magic, absurd length, crc
mismatch, or a past-the-end length followed by later valid frames - makes the scanner resync: it
searches forward for the next MAGIC that starts a complete, crc-valid frame and reports the bytes
in between as one ``corrupt`` range. If nothing valid follows, those bytes are a tail too, never
"corrupt": a live writer may be mid-write. The caller decides what a tail means: for a finished
segment it is garbage to count and skip; for a live one it is data not yet written. Records,
corrupt ranges and ``end`` always tile ``[start, end)`` exactly. Resync cannot be fooled by our
own payloads in practice: JSON and protobuf strings are UTF-8, where byte 0xC5 is never followed
by 0x1F, and binary ids would need a matching crc32 as well.

Lifecycle
---------
1. A writer (``SegmentWriter``) takes its writer lock and opens its first segment lazily on the
   first ``append`` (a process that never writes creates no file), appends batches of frames
   with one ``os.write`` on an unbuffered ``O_APPEND`` descriptor (a buffered file would lose
   its buffer when a pool child leaves with ``os._exit`` and would be duplicated by ``fork``),
   and rotates to ``seq+1`` past ``max_segment_bytes``, sealing the old one. A forked child
   never shares the parent's descriptors: it closes its inherited copies (segment and lock)
   and starts over under a writer id and lock of its own. A write cut short (a full disk)
   is truncated back to the last whole frame, so it leaves no torn record; the spans it held
   are counted in the drop ledger (``_drops``) by cause, a file of fixed size updated in place.
2. The shipper holds ``shipper.lock``, lists segments oldest first (``list_segments``), scans
   each from its cursor, sends what it finds, then commits the new offset with ``write_cursor``.
   A record before the cursor is never sent again; a crash between a successful send and the
   cursor write is the only way to resend (the outcome was unknown).

   **Cursor file.** Written now: exactly ``CURSOR_FILE_SIZE`` (60) bytes, two slots of 30::

       {offset: 20 decimal digits} {crc32 of those 20 ASCII digits: 8 lowercase hex}\n

   The offset is the larger of the slots whose crc matches (none: corrupt, read as 0). The
   shipper creates it (``reserve_cursor``, both slots 0) when it first sees a segment, while
   the disk has room; each commit then overwrites the slot holding the older value with one
   ``pwrite`` into the file's existing block. Nothing is allocated, so progress survives a
   full disk (ENOSPC cannot turn a delivered batch into a resent one), and a write torn by
   a kill leaves the other slot's value. Earlier versions wrote ``{offset}\n`` and replaced
   the file atomically: such a cursor is still read, and rewritten in the fixed form when
   the shipper first sees it. (On copy-on-write filesystems an overwrite may still need a
   block; a failed cursor write keeps the progress in the shipper's memory, logged.)

   **Freeing space early** (``_space``): once a segment's cursor is written, the shipper
   punches the pages before it out of the file (``FALLOC_FL_PUNCH_HOLE``, size and offsets
   unchanged), below the first record the attempt index still needs, so a live writer's
   segment gives space back as Langfuse takes its records. Punched bytes read as zeros and
   are never read: everything reads from a cursor or from the attempt index's own offset.
3. Segments of dead writers are *orphans*; any later shipper adopts them the same way.
4. A finished and fully shipped segment is removed with ``remove_segment`` (segment first, then
   cursor, so a crash in between never makes a shipped segment look unshipped).
5. Records Langfuse rejects for good go to ``dead-letter/`` with the reason, never resent.

Durability is against process death (SIGKILL, ``os._exit``, OOM kill), not power loss: nothing
is fsync'ed. Data written with ``write`` is in the kernel page cache and survives the process;
after a power cut, the tail of a segment may be missing (the scan treats it as torn) and a
cursor may be older than what was shipped (those records are resent).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

log = logging.getLogger(__name__)

StrPath: TypeAlias = "str | os.PathLike[str]"

MAGIC = b"\xc5\x1f"
KIND_SPAN = 1
KIND_OPEN = 2
KIND_DROPPED = 3
KIND_SEAL = 4
KIND_SCORE = 5
# One span's OTLP request is a few KiB to a few MiB (capped input/output); 16 MiB leaves room
# while letting the scanner reject a length field that can only be a bit flip.
MAX_PAYLOAD = 16 * 1024 * 1024
_HEADER = struct.Struct("<2sBII")  # magic, kind, length, crc32
HEADER_SIZE = _HEADER.size  # 11
_KIND_LEN = struct.Struct("<BI")
_CRC = struct.Struct("<I")
SPAN_ID_SIZE = 8
TRACE_ID_SIZE = 16

DEFAULT_MAX_SEGMENT_BYTES = 8 * 1024 * 1024
SEGMENT_SUFFIX = ".spool"
CURSOR_SUFFIX = ".cursor"
LOCK_NAME = "shipper.lock"
DEAD_LETTER_NAME = "dead-letter"
_REASON_SUFFIX = ".reason.json"

WRITER_LOCK_PREFIX = "writer-"
WRITER_LOCK_SUFFIX = ".lock"
_LOCK_TMP_SUFFIX = ".tmp"

_SEGMENT_RE = re.compile(r"seg-w([0-9a-f]{16})-([0-9]+)-([0-9]{6,})\.spool")
_LEGACY_SEGMENT_RE = re.compile(r"seg-([0-9]+)-([0-9]+)-([0-9]{6,})\.spool")
_HAVE_PROC = os.path.exists("/proc/self/stat")


class SpoolError(OSError):
    """The spool directory cannot be used; the message names the path and what to do."""


# --------------------------------------------------------------------------- framing


def encode_frame(kind: int, payload: bytes) -> bytes:
    """Return one framed record: MAGIC, kind, length, crc32(kind+length+payload), payload."""
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"record kind must fit in one byte, got {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    kind_len = _KIND_LEN.pack(kind, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(kind_len))
    return MAGIC + kind_len + _CRC.pack(crc) + payload


def span_payload(span_id: bytes, trace_id: bytes, otlp: bytes) -> bytes:
    """Build a KIND_SPAN payload; the ids up front let the shipper dedupe/split without parsing."""
    if len(span_id) != SPAN_ID_SIZE or len(trace_id) != TRACE_ID_SIZE:
        raise ValueError(
            f"span id must be {SPAN_ID_SIZE} bytes and trace id {TRACE_ID_SIZE}, "
            f"got {len(span_id)} and {len(trace_id)}"
        )
    return span_id + trace_id + otlp


def split_span_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a KIND_SPAN payload into (span_id, trace_id, otlp_request_bytes)."""
    ids = SPAN_ID_SIZE + TRACE_ID_SIZE
    if len(payload) < ids:
        raise ValueError(f"span payload of {len(payload)} bytes is shorter than its ids ({ids})")
    return payload[:SPAN_ID_SIZE], payload[SPAN_ID_SIZE:ids], payload[ids:]


class Record(NamedTuple):
    """One valid frame: its byte range ``[offset, end)`` in the scanned file, kind and payload.

    A named tuple: a scan makes one per record, and a frozen dataclass costs twice as much
    to build."""

    offset: int
    end: int
    kind: int
    payload: bytes


@dataclass
class ScanResult:
    """What a scan found; records and corrupt ranges tile ``[start, end)`` in order."""

    records: list[Record]
    corrupt: list[tuple[int, int]]
    end: int
    torn_tail: bool

    @property
    def sealed(self) -> bool:
        """True if the last record is a KIND_SEAL: its writer will never append to it again."""
        return bool(self.records) and self.records[-1].kind == KIND_SEAL


_OK, _SHORT, _BAD = 0, 1, 2


def _frame_at(data: bytes, view: memoryview, off: int) -> tuple[int, int, int]:
    """Classify the frame at ``off``: (_OK, kind, end) / (_SHORT, 0, 0) / (_BAD, 0, 0).

    _SHORT means "could be a frame still being written": not even a whole header, or a plausible
    header whose payload runs past the data. The caller still checks whether valid frames
    follow, because a bit flip in a length field looks exactly like that.
    """
    n = len(data)
    if n - off < HEADER_SIZE:
        return _SHORT, 0, 0
    magic, kind, length, crc = _HEADER.unpack_from(data, off)
    if magic != MAGIC or length > MAX_PAYLOAD:
        return _BAD, 0, 0
    end = off + HEADER_SIZE + length
    if end > n:
        return _SHORT, 0, 0
    actual = zlib.crc32(view[off + HEADER_SIZE : end], zlib.crc32(view[off + 2 : off + 7]))
    if actual != crc:
        return _BAD, 0, 0
    return _OK, kind, end


def _resync(data: bytes, view: memoryview, pos: int) -> int | None:
    """Offset of the next complete, crc-valid frame at or after ``pos``, or None."""
    while True:
        i = data.find(MAGIC, pos)
        if i < 0:
            return None
        if _frame_at(data, view, i)[0] == _OK:
            return i
        pos = i + 1


def _scan(data: bytes, start: int, base: int) -> ScanResult:
    # ``base`` is the file offset of data[0], so scan_file can read only the unshipped part and
    # still report file offsets.
    n = len(data)
    if start >= n:
        return ScanResult([], [], base + max(start, 0), False)
    if type(data) is not bytes:
        data = bytes(data)  # payloads are sliced from it
    view = memoryview(data)
    records: list[Record] = []
    corrupt: list[tuple[int, int]] = []
    off = max(start, 0)
    torn = False
    unpack, crc32, header = _HEADER.unpack_from, zlib.crc32, HEADER_SIZE
    while off < n:
        if n - off >= header:  # the common case, a whole valid frame, inline
            magic, kind, length, crc = unpack(data, off)
            end = off + header + length
            if (magic == MAGIC and length <= MAX_PAYLOAD and end <= n
                    and crc32(view[off + header : end], crc32(view[off + 2 : off + 7])) == crc):
                records.append(Record(base + off, base + end, kind, data[off + header : end]))
                off = end
                continue
        status, kind, end = _frame_at(data, view, off)  # not _OK: the fast path took those
        if status == _SHORT and n - off < HEADER_SIZE:
            torn = True  # not even a header left: nothing valid can follow
            break
        nxt = _resync(data, view, off + 1)
        if nxt is None:
            # Nothing valid after it: maybe a writer mid-write, so a tail, not corruption.
            torn = True
            break
        corrupt.append((base + off, base + nxt))
        off = nxt
    return ScanResult(records, corrupt, base + off, torn)


def scan(data: bytes, start: int = 0) -> ScanResult:
    """Scan ``data`` from ``start`` (see the module docstring for the rules); never raises."""
    return _scan(data, start, 0)


def scan_file(path: StrPath, start: int = 0, max_bytes: int | None = None) -> ScanResult:
    """Scan a file from byte ``start`` to its current end (or ``max_bytes`` further).

    Offsets are file offsets. With ``max_bytes``, a frame cut by the window's end is reported
    as a torn tail although the file goes on: the caller must not cut it.
    """
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if max_bytes is None else f.read(max_bytes)
    return _scan(data, 0, start)

_KINDS = frozenset({KIND_SPAN, KIND_OPEN, KIND_DROPPED, KIND_SEAL, KIND_SCORE})


def lost_records(raw: bytes) -> dict[int, int]:
    """Records that started in unreadable bytes (a corrupt range, a torn tail), by kind.

    Counted by the frame headers still recognisable in them (MAGIC, a known kind, a
    plausible length); bytes holding none count as one record of kind 0 (unknown).
    """
    counts: dict[int, int] = {}
    pos = raw.find(MAGIC)
    while 0 <= pos <= len(raw) - 7:
        kind, length = _KIND_LEN.unpack_from(raw, pos + 2)
        if kind in _KINDS and length <= MAX_PAYLOAD:
            counts[kind] = counts.get(kind, 0) + 1
        pos = raw.find(MAGIC, pos + 1)
    if not counts and raw.strip(b"\x00"):
        counts[0] = 1
    return counts


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (a signal, a nearly full disk): loop on the rest.
    written = os.write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` of all of ``data`` at ``offset`` (a short write goes on with the rest):
    an in-place overwrite of bytes the file already holds, which needs no new disk space."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

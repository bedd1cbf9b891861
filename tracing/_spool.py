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
* ``KIND_OPEN``: UTF-8 JSON describing a task attempt that has started (so the shipper can close
  it as ERROR if its process dies before the task ends).
* ``KIND_DROPPED``: UTF-8 JSON ``{"cause": str, "count": int}``: a writer's report that it
  dropped ``count`` spans before they reached the spool (``sdk_queue_full``: OpenTelemetry's
  span queue overflowed). The shipper adds the counts to its status by cause.
* ``KIND_SCORE``: UTF-8 JSON, one Langfuse ingestion event exactly as the shipper sends it in
  the ``batch`` of ``POST /api/public/ingestion`` (``_score_record``)::

      {"id": "<event id: 32 hex, drawn once at the call>", "type": "score-create",
       "timestamp": "<RFC 3339 UTC>", "body": {"id": "<score id>", "traceId": "<32 hex>",
       "observationId": "<16 hex, optional>", "name": "...", "value": 0.8 | "text" | 0/1,
       "dataType": "NUMERIC" | "CATEGORICAL" | "BOOLEAN", "comment": "...", ...}}

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
   and starts over under a writer id and lock of its own.
2. The shipper holds ``shipper.lock``, lists segments oldest first (``list_segments``), scans
   each from its cursor, sends what it finds, then commits the new offset with ``write_cursor``
   (atomic replace). A record before the cursor is never sent again; a crash between a
   successful send and the cursor write is the only way to resend (the outcome was unknown).
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

import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

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
    "write_cursor",
    "write_dead_letter",
    "writer_alive",
    "writer_lock_held",
    "writer_lock_name",
    "writer_segment_name",
]

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


@dataclass(frozen=True)
class Record:
    """One valid frame: its byte range ``[offset, end)`` in the scanned file, kind and payload."""

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
    view = memoryview(data)
    records: list[Record] = []
    corrupt: list[tuple[int, int]] = []
    off = max(start, 0)
    torn = False
    while off < n:
        status, kind, end = _frame_at(data, view, off)
        if status == _OK:
            records.append(
                Record(base + off, base + end, kind, bytes(view[off + HEADER_SIZE : end]))
            )
            off = end
            continue
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


# --------------------------------------------------------------------------- directories


def default_spool_dir() -> Path:
    """``$XDG_STATE_HOME/celery-langfuse/spool``, else ``~/.local/state/...``, else /tmp."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return Path(xdg) / "celery-langfuse" / "spool"
    try:
        home: Path | None = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry (containers, odd uids)
        home = None
    # Service users often have a home that does not exist or is not theirs (/nonexistent).
    if home is not None and home.is_dir() and os.access(home, os.W_OK | os.X_OK):
        return home / ".local" / "state" / "celery-langfuse" / "spool"
    # /tmp is shared: ensure_spool_dir refuses a directory another user created there.
    return Path(f"/tmp/celery-langfuse-{os.getuid()}") / "spool"


def ensure_spool_dir(path: StrPath) -> Path:
    """Create ``path`` (and missing parents) 0700, or check an existing one is usable.

    Raises SpoolError naming the path and the fix. An existing directory's mode is left alone
    (it may be deliberately shared with a group), but it must be ours: the spool holds task
    inputs and outputs, and under /tmp another user could have created it first.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        _make_private_dirs(p)
        st = os.stat(p)
    except OSError as e:
        raise SpoolError(
            f"cannot use spool directory {p}: {e.strerror}; "
            "set CELERY_LANGFUSE_SPOOL_DIR to a directory this user can write"
        ) from e
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolError(
            f"spool path {p} exists but is not a directory; remove it or set "
            "CELERY_LANGFUSE_SPOOL_DIR to another path"
        )
    euid = os.geteuid()
    if euid != 0 and st.st_uid != euid:
        raise SpoolError(
            f"spool directory {p} belongs to uid {st.st_uid}, not to this user (uid {euid}); "
            "use a directory you own (set CELERY_LANGFUSE_SPOOL_DIR)"
        )
    if not os.access(p, os.W_OK | os.X_OK):
        raise SpoolError(
            f"spool directory {p} is not writable by this user; fix its permissions "
            "(chmod 700) or set CELERY_LANGFUSE_SPOOL_DIR to a writable directory"
        )
    return p


def _make_private_dirs(p: Path) -> None:
    # os.makedirs(mode=) does not apply the mode to intermediate directories (3.7+), and the
    # umask could strip bits: create each missing level ourselves and chmod what we created.
    missing = []
    cur = p
    while not cur.exists():
        missing.append(cur)
        if cur.parent == cur:
            break
        cur = cur.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # another process won the race; ensure_spool_dir checks it next
        except OSError as e:
            raise SpoolError(
                f"cannot create spool directory {d}: {e.strerror}; create it (mode 0700) or "
                "set CELERY_LANGFUSE_SPOOL_DIR to a writable directory"
            ) from e
        os.chmod(d, 0o700)


def dead_letter_dir(spool_dir: StrPath) -> Path:
    """Path of the dead-letter folder (created by ``write_dead_letter`` when first needed)."""
    return Path(spool_dir) / DEAD_LETTER_NAME


# --------------------------------------------------------------------------- segment names


@dataclass(frozen=True, order=True)
class SegmentId:
    """Who wrote a segment and its sequence number.

    ``writer`` is the writer's random id, whose liveness is the lock file ``lock_path`` in
    ``directory`` (set by ``list_segments``); ``pid`` is then only for humans. For a segment
    named in the format of earlier versions ``writer`` is empty and the writer is the process
    ``pid`` started at ``starttime`` (liveness from /proc, see the module docstring).
    """

    pid: int
    starttime: int
    seq: int
    writer: str = ""
    directory: Path | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The segment's file name."""
        if self.writer:
            return writer_segment_name(self.writer, self.pid, self.seq)
        return segment_name(self.pid, self.starttime, self.seq)

    @property
    def lock_path(self) -> Path | None:
        """``{directory}/writer-{writer}.lock``; None for a legacy name or without a directory."""
        if not self.writer or self.directory is None:
            return None
        return self.directory / writer_lock_name(self.writer)


def writer_segment_name(writer: str, pid: int, seq: int) -> str:
    """``seg-w{writer}-{pid}-{seq:06d}.spool``: the name of every segment written now."""
    return f"seg-w{writer}-{pid}-{seq:06d}{SEGMENT_SUFFIX}"


def segment_name(pid: int, starttime: int, seq: int) -> str:
    """``seg-{pid}-{starttime}-{seq:06d}.spool``: the pid-based name of earlier versions.

    Never written any more; still parsed, adopted and shipped (and handy in tests to fake a
    segment whose writer is dead).
    """
    return f"seg-{pid}-{starttime}-{seq:06d}{SEGMENT_SUFFIX}"


def writer_lock_name(writer: str) -> str:
    """``writer-{writer}.lock``: the file a live writer keeps ``flock``ed."""
    return f"{WRITER_LOCK_PREFIX}{writer}{WRITER_LOCK_SUFFIX}"


def parse_segment_name(name: str, directory: StrPath | None = None) -> SegmentId | None:
    """Parse a segment file name; None for anything else (cursors, locks, temp files, strangers).

    ``directory`` (the spool the file is in) is what ``writer_alive`` needs to find the
    writer's lock file; ``list_segments`` always passes it.
    """
    where = Path(directory) if directory is not None else None
    m = _SEGMENT_RE.fullmatch(name)
    if m is not None:
        return SegmentId(int(m.group(2)), 0, int(m.group(3)), m.group(1), where)
    m = _LEGACY_SEGMENT_RE.fullmatch(name)
    if m is None:
        return None
    return SegmentId(int(m.group(1)), int(m.group(2)), int(m.group(3)), "", where)


def _parse_proc_stat(raw: bytes) -> tuple[str, int] | None:
    """(state, starttime) from the contents of /proc/{pid}/stat, or None if malformed."""
    # Field 2 (comm) is in parentheses and may itself contain spaces and ")": split after the
    # LAST ")". What follows starts at field 3 (state), so field 22 (starttime) is index 19.
    close = raw.rfind(b")")
    if close < 0:
        return None
    fields = raw[close + 1 :].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return _parse_proc_stat(raw)


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc field 22), None if unknown."""
    st = _proc_stat(pid)
    return None if st is None else st[1]


def writer_alive(seg: SegmentId) -> bool:
    """True if the writer of ``seg`` may still append to it: THE liveness test of the spool.

    The shipper (torn tails, deleting finished segments) and the attempt index (orphans) ask
    only this. A writer-id segment's writer is alive while its lock file is ``flock``ed; a
    legacy segment's while its pid runs with the same start time (see the module docstring).
    """
    if seg.writer:
        lock = seg.lock_path
        if lock is None:
            raise ValueError(
                f"writer_alive({seg.name}) needs the segment's directory: use list_segments or "
                "parse_segment_name(name, directory)"
            )
        return writer_lock_held(lock)
    return _legacy_writer_alive(seg)


def writer_lock_held(lock: StrPath) -> bool:
    """True if some process holds ``lock`` (a writer lock file) with an exclusive ``flock``.

    A non-blocking ``LOCK_SH`` attempt on our own descriptor, closed at once: refused means a
    writer holds it; granted, or no such file, means its writer is gone. Shared, so that
    concurrent readers (or a descriptor a fork happened to copy mid-test) never make each
    other look like writers. Any other error answers True: never cut or delete what may
    still be written.
    """
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as e:
        log.debug("cannot open writer lock %s (%s); assuming its writer is alive", lock, e)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        log.debug("cannot test writer lock %s (%s); assuming its writer is alive", lock, e)
        return True
    finally:
        os.close(fd)
    return False


def _legacy_writer_alive(seg: SegmentId) -> bool:
    # Earlier versions' names: same pid AND same start time. Meaningful only in the pid
    # namespace that wrote the segment.
    if seg.pid <= 0:  # kill(0, ...) would address our own process group
        return False
    if _HAVE_PROC:
        st = _proc_stat(seg.pid)
        if st is None:
            return False
        state, starttime = st
        # A zombie (exited, not yet reaped) will never write again.
        return state not in ("Z", "X", "x") and starttime == seg.starttime
    try:
        os.kill(seg.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else; cannot tell it from our writer
    return True


def take_writer_lock(spool_dir: StrPath, writer: str) -> int:
    """Create ``writer-{writer}.lock`` already locked (``LOCK_EX``); return its descriptor.

    Created and locked under a temporary name, then renamed into place: no reader ever sees
    the file unlocked while its writer lives. The caller keeps the descriptor open for as long
    as it may append (closing it is what releases the lock; the kernel does that at death).
    """
    final = Path(spool_dir) / writer_lock_name(writer)
    tmp = final.with_name(f".{final.name}{_LOCK_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # For humans wondering who writes; the lock itself is the flock.
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        _write_all(fd, json.dumps(info).encode("utf-8"))
        os.rename(tmp, final)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _lock_file_is(fd: int, path: Path) -> bool:
    """True if ``path`` is still the file open on ``fd`` (not deleted or replaced)."""
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def sweep_writer_locks(spool_dir: StrPath, *, tmp_grace: float = 60.0) -> int:
    """Remove the lock files of dead writers; return how many.

    ``remove_segment`` already removes a dead writer's lock with a segment; this catches
    strays (a writer killed before creating its first segment, or between creating the
    temporary lock file and renaming it: such a file is only removed once it is ``tmp_grace``
    seconds old, so a writer in the middle of those steps is never robbed).
    """
    d = Path(spool_dir)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return 0
    removed = 0
    now = time.time()
    for name in names:
        path = d / name
        if name.startswith(WRITER_LOCK_PREFIX) and name.endswith(WRITER_LOCK_SUFFIX):
            if writer_lock_held(path):
                continue
        elif name.startswith("." + WRITER_LOCK_PREFIX) and name.endswith(_LOCK_TMP_SUFFIX):
            try:
                if now - path.stat().st_mtime < tmp_grace or writer_lock_held(path):
                    continue
            except FileNotFoundError:
                continue
        else:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


def _drop_writer_lock_if_done(segment: Path) -> None:
    """After a segment is removed: remove its writer's lock file if the writer is dead, so lock
    files do not pile up (one per recycled pool child). A dead writer's lock file says nothing
    its absence does not (both read as dead), and a live writer's is never unlocked."""
    seg = parse_segment_name(segment.name, segment.parent)
    lock = seg.lock_path if seg is not None else None
    if lock is not None and not writer_lock_held(lock):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def new_writer_id() -> str:
    """16 lowercase hex digits from ``os.urandom``: unique across processes, pid namespaces
    and hosts sharing a spool directory (a collision needs about 2**32 writers)."""
    return os.urandom(8).hex()


# A per-process counter, so every segment a process creates gets a larger seq than the last
# (with several writers in one process too). A forked child starts its own counter.
_seq: tuple[int, Iterator[int]] = (os.getpid(), itertools.count())


def _next_seq() -> int:
    global _seq
    pid, counter = _seq
    if pid != os.getpid():
        _seq = (os.getpid(), itertools.count())
        counter = _seq[1]
    return next(counter)


def list_segments(spool_dir: StrPath) -> list[tuple[Path, SegmentId]]:
    """Segments in ``spool_dir``, oldest first (by mtime, then name); [] if the dir is missing."""
    found: list[tuple[int, str, Path, SegmentId]] = []
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        seg = parse_segment_name(entry.name, spool_dir)
        if seg is None:
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:
            continue  # removed by the shipper while we listed
        found.append((mtime, entry.name, Path(entry.path), seg))
    found.sort(key=lambda t: (t[0], t[1]))
    return [(path, seg) for _, _, path, seg in found]


# --------------------------------------------------------------------------- cursors


def cursor_path(segment: StrPath) -> Path:
    """``{segment}.cursor``."""
    p = Path(segment)
    return p.with_name(p.name + CURSOR_SUFFIX)


def read_cursor(segment: StrPath) -> int:
    """Committed offset of ``segment`` (0 if none). A corrupt cursor reads as 0, with a warning.

    0 means resending what was already shipped, which is why ``write_cursor`` replaces the file
    atomically: a killed shipper leaves the old cursor or the new one, never half of one.
    """
    path = cursor_path(segment)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    text = raw.strip()
    if text.isdigit() and text.isascii():
        return int(text)
    log.warning(
        "spool cursor %s is corrupt (%r); re-reading %s from the start",
        path,
        raw[:40],
        Path(segment).name,
    )
    return 0


def write_cursor(segment: StrPath, offset: int) -> None:
    """Atomically record that ``segment`` is shipped up to ``offset`` (tmp file + os.replace).

    No fsync: this protects against a killed process, not a power cut (after which the cursor
    may be older than what was shipped, so those records are sent again).
    """
    if offset < 0:
        raise ValueError(f"cursor offset must be >= 0, got {offset}")
    _write_file_atomic(cursor_path(segment), f"{offset}\n".encode("ascii"))


def remove_segment(segment: StrPath) -> None:
    """Delete a finished, fully shipped segment, then its cursor (in that order).

    If we die between the two unlinks, a stray cursor is harmless; the other order could leave
    a shipped segment without its cursor, and it would be sent again.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(segment)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cursor_path(segment))
    _drop_writer_lock_if_done(Path(segment))


def spool_size(spool_dir: StrPath) -> int:
    """Bytes not yet shipped: the sum over segments of (size - committed cursor)."""
    total = 0
    for path, _ in list_segments(spool_dir):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        total += max(0, size - read_cursor(path))
    return total


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (a signal, a nearly full disk): loop on the rest.
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --------------------------------------------------------------------------- writer


def _call_if_alive(ref: weakref.WeakMethod[Callable[[], None]]) -> None:
    # os.register_at_fork has no unregister. A strong reference would keep every writer (and
    # its descriptor) alive forever; a dead weak reference must be skipped, not called
    # (open-telemetry/opentelemetry-python#4422 / PR #4449 for the leak, #5452 for calling a
    # dead weakref). Exceptions in at-fork hooks are only printed, so keep it quiet.
    method = ref()
    if method is not None:
        with contextlib.suppress(Exception):
            method()


def _register_after_fork_in_child(method: Callable[[], None]) -> None:
    ref = weakref.WeakMethod(method)
    os.register_at_fork(after_in_child=functools.partial(_call_if_alive, ref))


class SegmentWriter:
    """Appends already-encoded frames to this process's current segment, rotating by size.

    Thread-safe. Fork-safe: a child never writes through the parent's descriptor, nor holds
    the parent's writer lock. From before its first segment exists until it is garbage-collected
    or its process dies, a writer holds ``writer-{id}.lock`` (see Liveness in the module
    docstring). OSError from the disk propagates; the caller logs and counts it (tracing must
    never fail a task).
    """

    def __init__(
        self, spool_dir: StrPath, max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES
    ) -> None:
        if max_segment_bytes <= 0:
            raise ValueError(f"max_segment_bytes must be > 0, got {max_segment_bytes}")
        # Validate (and create) the directory now, so a bad path fails at configuration time
        # with a clear message instead of at the first task; the segment itself stays lazy.
        self.spool_dir = ensure_spool_dir(spool_dir)
        self.max_segment_bytes = max_segment_bytes
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._torn = False  # a partial frame was left in the current segment
        self._writer: str | None = None  # random id, drawn with the writer lock
        self._lock_fd: int | None = None
        self._lock_release: weakref.finalize | None = None
        _register_after_fork_in_child(self._after_fork_in_child)

    @property
    def writer_id(self) -> str | None:
        """This writer's id (in its segment names and lock file), None before the first append."""
        return self._writer

    @property
    def current_path(self) -> Path | None:
        """The segment being appended to, or None before the first append / after close."""
        return self._path

    def append(self, frames: bytes) -> int:
        """Append ``frames`` (whole encoded frames) with one ``os.write``; return bytes written."""
        if os.getpid() != self._pid:
            # Forked without Python's at-fork hooks (a C-level fork()). Checked before taking
            # the lock, which may have been held by a thread that does not exist here.
            self._after_fork_in_child()
        if not frames:
            return 0
        with self._lock:
            if self._fd is not None and (
                self._torn or (self._size > 0 and self._size + len(frames) > self.max_segment_bytes)
            ):
                self._seal_and_close()
            if self._fd is None:
                self._open_segment()
            fd = self._fd
            assert fd is not None
            try:
                _write_all(fd, frames)
            except BaseException:
                # Includes exceptions raised by signal handlers between partial writes (e.g.
                # Celery's soft time limit). Find out what actually reached the file.
                self._note_failed_write(fd, len(frames))
                raise
            self._size += len(frames)
            return len(frames)

    def close(self) -> None:
        """Seal and close the current segment; a later append starts a new one."""
        if os.getpid() != self._pid:
            self._after_fork_in_child()  # the parent's segment is not ours to seal
            return
        with self._lock:
            if self._fd is not None:
                self._seal_and_close()

    def _note_failed_write(self, fd: int, wanted: int) -> None:
        try:
            actual = os.fstat(fd).st_size
        except OSError:
            self._torn = True  # cannot tell; start a fresh segment to be safe
            return
        if actual != self._size and actual != self._size + wanted:
            # Part of a frame is on disk. Later frames would still scan fine (resync), but
            # moving to a new segment keeps the damage at the end of a sealed one.
            self._torn = True
        self._size = actual

    def _hold_writer_lock(self) -> str:
        """Our writer id, with its lock file held; a new id if the file vanished under us."""
        writer, fd = self._writer, self._lock_fd
        if writer is not None and fd is not None:
            if _lock_file_is(fd, self.spool_dir / writer_lock_name(writer)):
                return writer
            # Deleted (the directory was cleaned up under us): readers would think us dead.
            self._drop_writer_lock()
        writer = new_writer_id()
        fd = take_writer_lock(self.spool_dir, writer)
        self._writer, self._lock_fd = writer, fd
        self._lock_release = weakref.finalize(self, _close_quietly, fd)
        return writer

    def _drop_writer_lock(self) -> None:
        release, self._lock_release = self._lock_release, None
        self._writer, self._lock_fd = None, None
        if release is not None:
            release()

    def _open_segment(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        recreated_dir = False
        while True:
            try:
                writer = self._hold_writer_lock()
            except FileNotFoundError:
                if recreated_dir:
                    raise
                ensure_spool_dir(self.spool_dir)
                recreated_dir = True
                continue
            path = self.spool_dir / writer_segment_name(writer, self._pid, _next_seq())
            try:
                # O_EXCL: a segment is only ever written by the writer that created it, even
                # with several writers in one process.
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if recreated_dir:
                    raise
                # The directory vanished (cleaned up under us): recreate it once.
                ensure_spool_dir(self.spool_dir)
                recreated_dir = True
                continue
            break
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask (e.g. 0o277)
        self._fd, self._path, self._size, self._torn = fd, path, 0, False

    def _seal_and_close(self) -> None:
        fd = self._fd
        self._fd, self._path, self._size, self._torn = None, None, 0, False
        if fd is None:
            return
        try:
            _write_all(fd, _SEAL_FRAME)
        except OSError as e:
            # Unsealed, the segment is reclaimed once this process exits instead.
            log.debug("could not seal spool segment: %s", e)
        finally:
            os.close(fd)

    def _after_fork_in_child(self) -> None:
        # The child inherited the parent's descriptors: close our copies (the parent keeps
        # writing through its own) without sealing, and start over under a writer id of its
        # own. Closing, never LOCK_UN, the writer lock: flock locks belong to the open file,
        # which parent and child share, so LOCK_UN here would make the parent look dead.
        # The mutex may have been held by a parent thread that does not exist in the child.
        self._lock = threading.Lock()
        fd = self._fd
        self._fd, self._path, self._size, self._torn = None, None, 0, False
        self._pid = os.getpid()
        lock_fd, release = self._lock_fd, self._lock_release
        self._writer, self._lock_fd, self._lock_release = None, None, None
        if release is not None:
            release.detach()  # the parent's finalizer must not run (again) in the child
        for inherited in (fd, lock_fd):
            if inherited is not None:
                _close_quietly(inherited)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_SEAL_FRAME = encode_frame(KIND_SEAL, b"")


# --------------------------------------------------------------------------- shipper lock


class ShipperLock:
    """Exclusive, non-blocking ``flock`` on ``{spool_dir}/shipper.lock``: one shipper per spool.

    The kernel drops the lock when every descriptor of the locked open file is closed, so a
    SIGKILLed shipper never leaves a stale lock. Fork subtlety (verified in
    tests/test_spool.py): a forked child shares the parent's open file and therefore its lock.
    The child must *close* its copy: closing it does not release the parent's lock, whereas
    ``LOCK_UN`` from the child would release it for both. If the child kept its copy, the lock
    would outlive a killed parent for as long as the child (e.g. an orphaned pool child) runs.
    O_CLOEXEC covers fork+exec. flock over NFS is emulated per process: keep spools local.
    """

    def __init__(self, spool_dir: StrPath) -> None:
        self.spool_dir = Path(spool_dir)
        self.path = self.spool_dir / LOCK_NAME
        self._fd: int | None = None
        self._pid = os.getpid()
        _register_after_fork_in_child(self._after_fork_in_child)

    @property
    def held(self) -> bool:
        """True if this object holds the lock in this process."""
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> bool:
        """Take the lock if free; False (immediately) if another shipper holds it."""
        if os.getpid() != self._pid:
            self._after_fork_in_child()
        if self._fd is not None:
            return True
        ensure_spool_dir(self.spool_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # For humans wondering who ships this spool; the lock itself is the flock.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            sweep_writer_locks(self.spool_dir)  # strays of writers that died before writing
        except OSError as e:
            log.debug("could not sweep writer locks in %s: %s", self.spool_dir, e)
        return True

    def release(self) -> None:
        """Release the lock (no-op if not held)."""
        if os.getpid() != self._pid:
            self._after_fork_in_child()
            return
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _after_fork_in_child(self) -> None:
        # Close, never unlock: see the class docstring.
        fd, self._fd = self._fd, None
        self._pid = os.getpid()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


# --------------------------------------------------------------------------- dead letters


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter file: the records set aside, and why."""

    path: Path
    reason: str
    time: float
    records: list[Record]

    @property
    def payloads(self) -> list[bytes]:
        """The records' payloads."""
        return [r.payload for r in self.records]


_dl_counter = itertools.count()


def write_dead_letter(
    spool_dir: StrPath, payloads: list[bytes], reason: str, kind: int = KIND_SPAN
) -> Path:
    """Set records aside for good: one framed file plus a ``.reason.json`` sidecar; its path."""
    d = ensure_spool_dir(dead_letter_dir(spool_dir))
    now = time.time()
    stem = f"dl-{time.time_ns()}-{os.getpid()}-{next(_dl_counter)}"
    path = d / (stem + SEGMENT_SUFFIX)
    data = b"".join(encode_frame(kind, p) for p in payloads)
    meta = {
        "reason": reason,
        "time": now,
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "count": len(payloads),
        "bytes": len(data),
    }
    # Data first, then the reason: a reader tolerates a missing sidecar, not a half file.
    _write_file_atomic(path, data)
    _write_file_atomic(d / (stem + _REASON_SUFFIX), json.dumps(meta).encode("utf-8"))
    return path


def remove_dead_letter(path: StrPath) -> None:
    """Delete one dead-letter file and its reason sidecar."""
    p = Path(path)
    p.unlink(missing_ok=True)
    p.with_name(p.name.removesuffix(SEGMENT_SUFFIX) + _REASON_SUFFIX).unlink(missing_ok=True)


def read_dead_letters(spool_dir: StrPath) -> list[DeadLetter]:
    """All dead-letter files, oldest first, with their reasons."""
    d = dead_letter_dir(spool_dir)
    try:
        names = sorted(n for n in os.listdir(d) if n.startswith("dl-") and n.endswith(".spool"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = d / name
        try:
            result = scan_file(path)
        except FileNotFoundError:
            continue
        reason, when = "unknown (no reason file)", 0.0
        try:
            meta = json.loads((d / (name[: -len(SEGMENT_SUFFIX)] + _REASON_SUFFIX)).read_bytes())
            reason, when = str(meta.get("reason", reason)), float(meta.get("time", 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            with contextlib.suppress(OSError):
                when = path.stat().st_mtime
        out.append(DeadLetter(path, reason, when, result.records))
    return out


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

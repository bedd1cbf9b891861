"""Shipper-side spool state: cursors, segment removal, the one-shipper lock, dead letters
(``Lifecycle`` steps 2, 4 and 5 of the format spec in ``tracing.spool._format``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from tracing.spool._drops import reserve_ledger
from tracing.spool._format import (
    _REASON_SUFFIX,
    CURSOR_SUFFIX,
    KIND_SPAN,
    LOCK_NAME,
    SEGMENT_SUFFIX,
    Record,
    StrPath,
    _write_all,
    encode_frame,
    scan_file,
    write_all_at,
)
from tracing.spool._segments import (
    _drop_writer_lock_if_done,
    _register_after_fork_in_child,
    dead_letter_dir,
    ensure_spool_dir,
    list_segments,
    sweep_writer_locks,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- cursors


def cursor_path(segment: StrPath) -> Path:
    """``{segment}.cursor``."""
    p = Path(segment)
    return p.with_name(p.name + CURSOR_SUFFIX)


CURSOR_SLOT_SIZE = 30
CURSOR_FILE_SIZE = 2 * CURSOR_SLOT_SIZE
_SLOT_RE = re.compile(rb"([0-9]{20}) ([0-9a-f]{8})\n")


def _slot(offset: int) -> bytes:
    digits = f"{offset:020d}".encode("ascii")
    return digits + f" {zlib.crc32(digits):08x}\n".encode("ascii")


def _slot_value(raw: bytes) -> int | None:
    m = _SLOT_RE.fullmatch(raw)
    if m is None or zlib.crc32(m.group(1)) != int(m.group(2), 16):
        return None
    return int(m.group(1))


def _parse_cursor(raw: bytes) -> int | None:
    """The offset a cursor file holds (either form, see the format spec); None if corrupt."""
    if len(raw) == CURSOR_FILE_SIZE:
        values = [v for v in (_slot_value(raw[:CURSOR_SLOT_SIZE]),
                              _slot_value(raw[CURSOR_SLOT_SIZE:])) if v is not None]
        return max(values) if values else None
    text = raw.strip()  # the form of earlier versions: decimal digits and a newline
    if text.isdigit() and text.isascii():
        return int(text)
    return None


def read_cursor(segment: StrPath) -> int:
    """Committed offset of ``segment`` (0 if none). A corrupt cursor reads as 0, with a warning.

    0 means resending what was already shipped, which is why a cursor has two checksummed
    slots (``write_cursor``): a shipper killed mid-write leaves the other slot intact.
    """
    path = cursor_path(segment)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    value = _parse_cursor(raw)
    if value is not None:
        return value
    log.warning(
        "spool cursor %s is corrupt (%r); re-reading %s from the start",
        path,
        raw[:40],
        Path(segment).name,
    )
    return 0


def reserve_cursor(segment: StrPath) -> int:
    """Make sure ``segment`` has a cursor file of the fixed size; return its offset.

    Called by the shipper when it first sees a segment, while the disk has room, so that every
    later ``write_cursor`` overwrites bytes in place and cannot fail for lack of space. A
    cursor in the form of earlier versions is rewritten in the fixed form (same offset).
    Raises OSError when the file cannot be created (e.g. the disk is already full).
    """
    path = cursor_path(segment)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        os.stat(segment)  # FileNotFoundError: no cursor for a segment already removed
        _create_file(path, _slot(0) * 2)
        return 0
    value = _parse_cursor(raw)
    if len(raw) != CURSOR_FILE_SIZE:
        _write_file_atomic(path, _slot(value or 0) * 2)
    return value or 0


def reserve_new_cursor(segment: StrPath) -> None:
    """Create the fixed-size cursor (at 0) of a segment about to be created: what a writer
    does before creating each segment. Raises OSError if there is no room."""
    _create_file(cursor_path(segment), _slot(0) * 2)


def write_cursor(segment: StrPath, offset: int) -> None:
    """Record that ``segment`` is shipped up to ``offset``.

    A reserved cursor (``reserve_cursor``) is updated in place: one ``pwrite`` of a 30-byte
    slot into the file's existing block, overwriting the slot that holds the older (or an
    unreadable) value, so the newer value survives a torn write and no block is allocated: it
    works on a full disk. Otherwise (no cursor yet, or one of an earlier version) the file is
    replaced atomically (tmp file + ``os.replace``), which needs space. No fsync: this
    protects against a killed process, not a power cut (after which the cursor may be older
    than what was shipped, so those records are sent again).
    """
    if offset < 0:
        raise ValueError(f"cursor offset must be >= 0, got {offset}")
    path = cursor_path(segment)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            raw = os.pread(fd, CURSOR_FILE_SIZE + 1, 0)
            if len(raw) == CURSOR_FILE_SIZE:
                first = _slot_value(raw[:CURSOR_SLOT_SIZE])
                second = _slot_value(raw[CURSOR_SLOT_SIZE:])
                older_first = first is None or (second is not None and first <= second)
                write_all_at(fd, _slot(offset), 0 if older_first else CURSOR_SLOT_SIZE)
                return
        finally:
            os.close(fd)
    _write_file_atomic(path, _slot(offset) * 2)


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
        reserve_ledger(self.spool_dir)  # while there is room: writers count drops in place
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


def _temp_file_holding(path: Path, data: bytes) -> Path:
    """A new 0600 file beside ``path`` holding ``data`` whole (removed again if that fails)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _create_file(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` whole, never replacing a file created meanwhile."""
    tmp = _temp_file_holding(path, data)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_file_holding(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

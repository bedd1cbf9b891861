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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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

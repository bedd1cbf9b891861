"""The segment writer: appends frames to this process's current segment (``Lifecycle`` step 1
of the format spec in ``tracing.spool._format``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from pathlib import Path

from tracing.spool._cursors import cursor_path, reserve_new_cursor
from tracing.spool._format import (
    DEFAULT_MAX_SEGMENT_BYTES,
    KIND_SEAL,
    StrPath,
    _write_all,
    encode_frame,
)
from tracing.spool._segments import (
    _lock_file_is,
    _next_seq,
    _register_after_fork_in_child,
    ensure_spool_dir,
    new_writer_id,
    take_writer_lock,
    writer_lock_name,
    writer_segment_name,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- writer






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
            # Part of the frames is on disk (a full disk cut the write short, or a signal
            # interrupted it). Truncating back to the last whole frame frees that space and
            # leaves no torn record for the shipper to take for a writer killed mid-write.
            try:
                os.ftruncate(fd, self._size)
                return
            except OSError:
                # Later frames would still scan fine (resync), but moving to a new segment
                # keeps the damage at the end of a sealed one.
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
                # Its cursor first, at its fixed size: the shipper's progress in this segment
                # can then always be written in place, even once the disk is full. No room
                # for it: no segment (the append fails and its spans are counted as dropped).
                reserve_new_cursor(path)
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
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(cursor_path(path))
                raise
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

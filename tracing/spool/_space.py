"""Giving disk space back as soon as Langfuse takes records: punching the shipped prefix.

A segment is only deleted once it is finished (sealed, or its writer dead), and a live
writer's segment may be the whole disk. So the shipper also frees the bytes *before* a
segment's durable cursor with ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``:
the file keeps its size and every offset (the writer keeps appending with ``O_APPEND``, the
cursor stays valid), the punched range reads as zeros and occupies no blocks. Freeing needs
no space, so it works on a full disk. Only whole pages are punched, only below the durable
cursor and below every record the attempt index still needs (``Shipper`` passes that limit),
so nothing ever reads a punched range. Where the kernel or filesystem cannot punch
(EOPNOTSUPP, not Linux), nothing is freed until the segment is deleted, as before.
The segment's mtime (its place in the shipping order) is put back after punching.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import sys

from tracing.spool._format import StrPath

log = logging.getLogger(__name__)

PAGE = 4096
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()
_unsupported = _fallocate is None


def punchable(limit: int) -> int:
    """The longest page-aligned prefix of ``limit`` bytes."""
    return max(0, limit) // PAGE * PAGE


def punch_prefix(path: StrPath, length: int) -> bool:
    """Free the first ``length`` bytes of ``path`` (a multiple of ``PAGE``); True if done.

    Never raises: a file that vanished, or a filesystem that cannot punch, answers False.
    """
    global _unsupported
    if _unsupported or length <= 0 or _fallocate is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        before = os.fstat(fd)
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(fd, mode, 0, length) != 0:  # type: ignore[operator]
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                _unsupported = True
                log.info("this filesystem cannot punch holes (%s); shipped spool bytes are "
                         "freed when their segment is deleted", os.strerror(err))
            return False
        with contextlib.suppress(OSError):
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        return True
    finally:
        os.close(fd)

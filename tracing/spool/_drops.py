"""The drop ledger: spans a writer could not store, counted where a full disk cannot stop it.

A writer that fails to append (the disk is full, the directory unwritable) cannot report it
in a record (``KIND_DROPPED`` needs space). It adds the count to ``{spool_dir}/dropped.ledger``
instead: a file of exactly ``LEDGER_SIZE`` bytes, created (``reserve_ledger``) by the shipper
when it takes the spool and by every writer with its lock, while there is space. Updating it
rewrites those bytes in place (``pwrite`` at offset 0 under an exclusive ``flock``), which
allocates nothing on filesystems that overwrite in place (ext4, xfs, tmpfs; not copy-on-write
btrfs/ZFS, where an update can fail like any write: the count then stays in the process's
memory and is retried with its next drop).

Format: ASCII, ``LEDGER_SIZE`` bytes, one line per (writer, cause)::

    {writer: 16 hex, or 16 "-" when unknown} {cause: <= 24 chars, padded} {count: 20 digits}\\n

then spaces up to the size, ending in ``\\n``. Counts only grow: they are running totals for
the spool's lifetime (the shipper reports their sums by cause in its status). Lines that do
not parse are ignored (a reader never fails on the ledger). When the table is full, a new
(writer, cause) is added to the unknown writer's line for that cause.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from pathlib import Path

from tracing.spool._format import StrPath, write_all_at

# Causes written by this package (the ledger accepts any short word).
DISK_FULL = "disk_full"  # ENOSPC / EDQUOT while appending
WRITE_FAILED = "write_failed"  # any other error while appending
UNENCODABLE = "unencodable"  # the span could not be encoded as a record

LEDGER_NAME = "dropped.ledger"
LEDGER_SIZE = 8192
ANY_WRITER = "-" * 16
_CAUSE_WIDTH = 24
_LINE = re.compile(rb"([0-9a-f]{16}|-{16}) (\S{1,24}) *([0-9]{20})")


def ledger_path(spool_dir: StrPath) -> Path:
    """``{spool_dir}/dropped.ledger``."""
    return Path(spool_dir) / LEDGER_NAME


def reserve_ledger(spool_dir: StrPath) -> bool:
    """Create the ledger at its full size if it is missing; False if it cannot (no space)."""
    path = ledger_path(spool_dir)
    if path.exists():
        return True
    tmp = path.with_name(f".{LEDGER_NAME}.{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all_at(fd, _render({}), 0)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # never replaces a ledger another process created meanwhile
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def record_drops(spool_dir: StrPath, writer: str | None, counts: dict[str, int]) -> bool:
    """Add ``counts`` (cause -> spans) to ``writer``'s lines; False if the ledger is unusable.

    Creates the ledger if it is missing (which needs space); never raises.
    """
    if not counts:
        return True
    who = writer if writer and len(writer) == 16 else ANY_WRITER
    path = ledger_path(spool_dir)
    try:
        if not path.exists() and not reserve_ledger(spool_dir):
            return False
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        table = _parse(os.pread(fd, size, 0))
        for cause, count in counts.items():
            key = (who, _cause(cause))
            table[key] = table.get(key, 0) + count
        data = _render(table, size)
        if len(data) > size:
            data = _render(_fold(table), size)
        if len(data) > size:
            return False
        write_all_at(fd, data, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the flock


def read_ledger(spool_dir: StrPath) -> dict[tuple[str, str], int]:
    """Every (writer, cause) line of the ledger; {} if there is none."""
    try:
        fd = os.open(ledger_path(spool_dir), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _parse(os.pread(fd, os.fstat(fd).st_size, 0))
    except OSError:
        return {}
    finally:
        os.close(fd)


def totals_by_cause(table: dict[tuple[str, str], int]) -> dict[str, int]:
    """The ledger's counts summed per cause."""
    totals: dict[str, int] = {}
    for (_, cause), count in table.items():
        totals[cause] = totals.get(cause, 0) + count
    return totals


def _cause(cause: str) -> str:
    cleaned = re.sub(r"\s+", "_", cause.strip()) or "unknown"
    return cleaned[:_CAUSE_WIDTH]


def _parse(raw: bytes) -> dict[tuple[str, str], int]:
    table: dict[tuple[str, str], int] = {}
    for line in raw.split(b"\n"):
        m = _LINE.fullmatch(line.strip())
        if m is not None:
            key = (m.group(1).decode(), m.group(2).decode())
            table[key] = table.get(key, 0) + int(m.group(3))
    return table


def _fold(table: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """The table with every writer's lines merged into the unknown writer's, per cause."""
    return {(ANY_WRITER, cause): count for cause, count in totals_by_cause(table).items()}


def _render(table: dict[tuple[str, str], int], size: int = LEDGER_SIZE) -> bytes:
    lines = b"".join(
        f"{writer} {cause:<{_CAUSE_WIDTH}} {count:020d}\n".encode("ascii")
        for (writer, cause), count in sorted(table.items())
    )
    if len(lines) >= size:
        return lines
    return lines + b" " * (size - len(lines) - 1) + b"\n"

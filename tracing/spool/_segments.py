"""Spool directories, segment names, and writer liveness (the ``Liveness`` section of the
format spec in ``tracing.spool._format``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import socket
import stat
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tracing.spool._format import (
    _HAVE_PROC,
    _LEGACY_SEGMENT_RE,
    _LOCK_TMP_SUFFIX,
    _SEGMENT_RE,
    DEAD_LETTER_NAME,
    SEGMENT_SUFFIX,
    WRITER_LOCK_PREFIX,
    WRITER_LOCK_SUFFIX,
    SpoolError,
    StrPath,
    _write_all,
)

log = logging.getLogger(__name__)

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
    m = _SEGMENT_RE.fullmatch(name)
    legacy = _LEGACY_SEGMENT_RE.fullmatch(name) if m is None else None
    if m is None and legacy is None:
        return None
    where = (directory if isinstance(directory, Path) or directory is None
             else Path(directory))
    if m is not None:
        return SegmentId(int(m.group(2)), 0, int(m.group(3)), m.group(1), where)
    assert legacy is not None
    return SegmentId(int(legacy.group(1)), int(legacy.group(2)), int(legacy.group(3)), "", where)


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
    directory = Path(spool_dir)  # made once, not once per entry
    for entry in entries:
        if not entry.name.endswith(SEGMENT_SUFFIX):
            continue  # cursors, locks, the status file: most of the entries
        seg = parse_segment_name(entry.name, directory)
        if seg is None:
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:
            continue  # removed by the shipper while we listed
        found.append((mtime, entry.name, Path(entry.path), seg))
    found.sort(key=lambda t: (t[0], t[1]))
    return [(path, seg) for _, _, path, seg in found]

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

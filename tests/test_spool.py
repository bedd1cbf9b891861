"""Tests for tracing.spool: framing, scanning, segment files, cursors, the shipper lock."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import gc
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracing.spool import (
    HEADER_SIZE,
    KIND_OPEN,
    KIND_SEAL,
    KIND_SPAN,
    MAGIC,
    MAX_PAYLOAD,
    Record,
    ScanResult,
    SegmentId,
    SegmentWriter,
    ShipperLock,
    SpoolError,
    _segments,
    cursor_path,
    default_spool_dir,
    encode_frame,
    ensure_spool_dir,
    list_segments,
    parse_segment_name,
    process_start_time,
    read_cursor,
    read_dead_letters,
    remove_segment,
    scan,
    scan_file,
    segment_name,
    span_payload,
    split_span_payload,
    spool_size,
    sweep_writer_locks,
    take_writer_lock,
    write_cursor,
    write_dead_letter,
    writer_alive,
    writer_lock_held,
    writer_lock_name,
    writer_segment_name,
)

ROOT = Path(__file__).resolve().parent.parent
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frame_st = st.tuples(st.integers(0, 255), st.binary(max_size=200))
frames_st = st.lists(frame_st, max_size=8)


def build(frames: list[tuple[int, bytes]]) -> tuple[bytes, list[tuple[int, int]]]:
    """Concatenate encoded frames; return the data and each frame's (offset, end)."""
    out = b""
    spans = []
    for kind, payload in frames:
        f = encode_frame(kind, payload)
        spans.append((len(out), len(out) + len(f)))
        out += f
    return out, spans


def check_invariants(data: bytes, start: int, r: ScanResult) -> None:
    """Assert the structural promises every scan result keeps, whatever the input."""
    pos = max(start, 0)
    pieces = sorted([(x.offset, x.end) for x in r.records] + r.corrupt)
    for a, b in pieces:
        assert a == pos and b > a, (pieces, start)
        pos = b
    assert pos == r.end or (not pieces and r.end == max(start, 0))
    assert r.end <= max(len(data), start)
    assert r.torn_tail == (r.end < len(data))
    for rec in r.records:
        # A returned record is exactly a valid frame: re-encoding reproduces its bytes.
        assert data[rec.offset : rec.end] == encode_frame(rec.kind, rec.payload)


def as_pairs(r: ScanResult) -> list[tuple[int, bytes]]:
    """(kind, payload) of each record, for comparing with what was written."""
    return [(x.kind, x.payload) for x in r.records]


def _reap(pid: int, timeout: float = 60.0) -> int:
    """Wait (bounded) for a forked child and return its exit code; a child still running
    after ``timeout`` seconds is killed and the test fails saying so."""
    pidfd = os.pidfd_open(pid)  # readable once the child has exited
    try:
        exited = select.select([pidfd], [], [], timeout)[0]
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"forked child {pid} still running after {timeout:.0f} s (killed)")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --------------------------------------------------------------------------- framing


def test_encode_frame_layout() -> None:
    """A frame is MAGIC, kind, LE length, LE crc32 over kind+length+payload, then the payload."""
    import struct
    import zlib

    f = encode_frame(KIND_SPAN, b"hello")
    assert f[:2] == MAGIC and f[2] == KIND_SPAN
    assert struct.unpack("<I", f[3:7])[0] == 5
    assert struct.unpack("<I", f[7:11])[0] == zlib.crc32(f[2:7] + b"hello")
    assert f[HEADER_SIZE:] == b"hello" and len(f) == HEADER_SIZE + 5


def test_encode_frame_rejects_bad_kind_and_huge_payload() -> None:
    """Kinds outside one byte and payloads over MAX_PAYLOAD are refused at encode time."""
    with pytest.raises(ValueError):
        encode_frame(256, b"")
    with pytest.raises(ValueError):
        encode_frame(KIND_SPAN, bytes(MAX_PAYLOAD + 1))


def test_span_payload_round_trip() -> None:
    """span_payload puts span id and trace id before the OTLP bytes; split undoes it."""
    p = span_payload(b"S" * 8, b"T" * 16, b"otlp")
    assert split_span_payload(p) == (b"S" * 8, b"T" * 16, b"otlp")
    with pytest.raises(ValueError):
        span_payload(b"S" * 7, b"T" * 16, b"")
    with pytest.raises(ValueError):
        split_span_payload(b"short")


@PROPS
@given(frames_st, st.data())
def test_truncation_scans_to_a_prefix_of_whole_records(frames: list, data: st.DataObject) -> None:
    """Frames cut at any byte scan back to exactly the whole records before the cut."""
    full, spans = build(frames)
    cut = data.draw(st.integers(0, len(full)))
    r = scan(full[:cut])
    whole = sum(1 for _, end in spans if end <= cut)
    assert as_pairs(r) == frames[:whole]
    assert r.corrupt == []
    assert r.end == (spans[whole - 1][1] if whole else 0)
    assert r.torn_tail == (cut > r.end)
    check_invariants(full[:cut], 0, r)
    # A later scan resuming at ``end`` over the completed data finds exactly the rest.
    rest = scan(full, r.end)
    assert as_pairs(rest) == frames[whole:] and rest.corrupt == [] and not rest.torn_tail


@PROPS
@given(st.lists(frame_st, min_size=2, max_size=8), st.data())
def test_bit_flip_in_a_middle_record_costs_only_that_record(
    frames: list, data: st.DataObject
) -> None:
    """A bit flip inside one non-last record leaves all others intact and reports just it."""
    full, spans = build(frames)
    i = data.draw(st.integers(0, len(frames) - 2), label="record")
    off, end = spans[i]
    bit = data.draw(st.integers(off * 8, end * 8 - 1), label="bit")
    damaged = bytearray(full)
    damaged[bit // 8] ^= 1 << (bit % 8)
    r = scan(bytes(damaged))
    assert as_pairs(r) == frames[:i] + frames[i + 1 :]
    assert r.corrupt == [(off, end)]
    assert not r.torn_tail and r.end == len(full)
    check_invariants(bytes(damaged), 0, r)


@PROPS
@given(st.lists(frame_st, min_size=1, max_size=6), st.data())
def test_bit_flip_in_the_last_record_never_yields_a_wrong_record(
    frames: list, data: st.DataObject
) -> None:
    """A bit flip in the last record makes it corrupt or a tail, and every other record survives."""
    full, spans = build(frames)
    off, end = spans[-1]
    bit = data.draw(st.integers(off * 8, end * 8 - 1))
    damaged = bytearray(full)
    damaged[bit // 8] ^= 1 << (bit % 8)
    r = scan(bytes(damaged))
    assert as_pairs(r) == frames[:-1]
    assert r.corrupt in ([], [(off, end)])
    assert r.torn_tail or r.corrupt == [(off, end)]
    check_invariants(bytes(damaged), 0, r)


piece_st = st.one_of(
    st.binary(max_size=64),
    st.just(MAGIC),
    frame_st.map(lambda kp: encode_frame(*kp)),
    st.tuples(frame_st, st.integers(0, 300)).map(lambda t: encode_frame(*t[0])[: t[1]]),
    st.tuples(st.integers(0, 2**32 - 1)).map(
        lambda t: MAGIC + b"\x01" + t[0].to_bytes(4, "little")
    ),
)


@PROPS
@given(st.lists(piece_st, max_size=12).map(b"".join), st.data())
def test_garbage_never_raises_and_never_yields_an_invalid_record(
    blob: bytes, data: st.DataObject
) -> None:
    """Arbitrary bytes (frames, fragments, stray magic, random) scan without error, soundly."""
    start = data.draw(st.integers(0, len(blob) + 3))
    r = scan(blob, start)
    check_invariants(blob, start, r)


@PROPS
@given(st.lists(st.tuples(frame_st, st.binary(max_size=40)), max_size=6))
def test_garbage_between_frames_is_skipped_and_every_frame_recovered(pairs: list) -> None:
    """Garbage without MAGIC between frames becomes corrupt ranges; all frames still scan."""
    blob = b""
    for (kind, payload), junk in pairs:
        blob += junk.replace(MAGIC, b"") + encode_frame(kind, payload)
    r = scan(blob)
    assert as_pairs(r) == [kp for kp, _ in pairs]
    assert not r.torn_tail
    check_invariants(blob, 0, r)


def test_length_flipped_past_end_does_not_hide_later_records() -> None:
    """A middle record whose length now points past EOF is corrupt, not a tail hiding the rest."""
    full, spans = build([(KIND_SPAN, b"a" * 10), (KIND_SPAN, b"b" * 10), (KIND_OPEN, b"{}")])
    damaged = bytearray(full)
    damaged[spans[1][0] + 5] ^= 0x10  # length += 1 MiB, still below MAX_PAYLOAD
    r = scan(bytes(damaged))
    assert as_pairs(r) == [(KIND_SPAN, b"a" * 10), (KIND_OPEN, b"{}")]
    assert r.corrupt == [spans[1]]


def test_scan_file_torn_tail_at_several_offsets(tmp_path: Path) -> None:
    """A file ending mid-frame (magic, header or payload) keeps whole records, flags a tail."""
    frames = [(KIND_SPAN, b"x" * 30), (KIND_OPEN, b'{"a": 1}'), (KIND_SPAN, b"y" * 50)]
    full, spans = build(frames)
    last_off = spans[-1][0]
    path = tmp_path / "seg"
    for cut in (last_off + 1, last_off + 2, last_off + 7, last_off + HEADER_SIZE, len(full) - 1):
        path.write_bytes(full[:cut])
        r = scan_file(path)
        assert as_pairs(r) == frames[:2] and r.corrupt == [] and r.torn_tail
        assert r.end == last_off
        # Resuming from a committed offset reports file offsets, not buffer offsets.
        r2 = scan_file(path, spans[1][0])
        assert [x.offset for x in r2.records] == [spans[1][0]] and r2.end == last_off
    path.write_bytes(full)
    r = scan_file(path, last_off)
    assert as_pairs(r) == frames[2:] and r.records[0].offset == last_off and r.end == len(full)
    assert scan_file(path, len(full) + 5) == ScanResult([], [], len(full) + 5, False)


def test_scan_sealed_flag() -> None:
    """ScanResult.sealed is true only when the last record is a KIND_SEAL."""
    assert scan(encode_frame(KIND_SPAN, b"a") + encode_frame(KIND_SEAL, b"")).sealed
    assert not scan(encode_frame(KIND_SEAL, b"") + encode_frame(KIND_SPAN, b"a")).sealed
    assert not scan(b"").sealed


# --------------------------------------------------------------------------- names, liveness


def test_segment_names_round_trip_and_strangers_are_ignored() -> None:
    """parse_segment_name inverts both name formats and rejects cursors, locks, temp files."""
    name = writer_segment_name("0123456789abcdef", 1, 7)
    assert name == "seg-w0123456789abcdef-1-000007.spool"
    assert parse_segment_name(name) == SegmentId(1, 0, 7, "0123456789abcdef")
    assert SegmentId(1, 0, 7, "0123456789abcdef").name == name
    legacy = segment_name(123, 456789, 7)
    assert legacy == "seg-123-456789-000007.spool"
    assert parse_segment_name(legacy) == SegmentId(123, 456789, 7)
    assert SegmentId(1, 2, 3).name == "seg-1-2-000003.spool"
    for other in (name + ".cursor", legacy + ".tmp-1-2", "shipper.lock", "seg-1-2-3.spool", "x",
                  writer_lock_name("0123456789abcdef"), "seg-w0123-1-000001.spool",
                  "seg-wABCDEF0123456789-1-000001.spool"):
        assert parse_segment_name(other) is None


def test_writer_ids_differ_between_writers_and_processes(tmp_path: Path) -> None:
    """Two writers, even in one process, and a forked child each get their own random id."""
    a, b = SegmentWriter(tmp_path), SegmentWriter(tmp_path)
    a.append(encode_frame(KIND_SPAN, b"a"))
    b.append(encode_frame(KIND_SPAN, b"b"))
    assert a.writer_id and b.writer_id and a.writer_id != b.writer_id
    assert len({s.writer for _, s in list_segments(tmp_path)}) == 2


def test_writer_alive_is_its_lock_across_fork_and_death(tmp_path: Path) -> None:
    """A writer is alive exactly while its lock is held: the parent stays alive when a forked
    child (which inherited the lock descriptor) exits via os._exit, and the child is dead then."""
    w = SegmentWriter(tmp_path)
    w.append(encode_frame(KIND_SPAN, b"parent"))
    r, wr = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(go_w)
            w.append(encode_frame(KIND_SPAN, b"child"))
            os.write(wr, b"x")  # written: the child's segment and lock exist
            os.read(go_r, 1)  # until the parent says go (closes its end)
            code = 0
        finally:
            os._exit(code)
    os.close(wr)
    os.close(go_r)
    assert os.read(r, 1) == b"x", "the child never wrote"
    os.close(r)
    segs = {s.writer: s for _, s in list_segments(tmp_path)}
    assert len(segs) == 2
    mine = w.writer_id or ""
    parent, child = segs[mine], next(s for k, s in segs.items() if k != mine)
    assert writer_alive(parent) and writer_alive(child)
    os.close(go_w)
    assert _reap(pid) == 0
    assert writer_alive(parent), "the child's exit released the parent's lock"
    assert not writer_alive(child)
    w.close()
    assert writer_alive(parent), "a closed writer may append again: it stays alive"
    del w
    gc.collect()
    assert not writer_alive(parent), "a collected writer released its lock"


def test_writer_alive_sees_a_writer_killed_in_another_pid_namespace(tmp_path: Path) -> None:
    """A writer in another pid namespace is alive while it runs and dead once SIGKILLed."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("unshare --pid is not allowed here (needs root)")
    code = textwrap.dedent(f"""
        import sys, time
        from tracing.spool import SegmentWriter, encode_frame, KIND_SPAN
        w = SegmentWriter({str(tmp_path)!r})
        w.append(encode_frame(KIND_SPAN, b"x" * 20))
        w.append(encode_frame(KIND_SPAN, b"y" * 20)[:9])  # a torn tail, as if killed mid-write
        print(w.writer_id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        writer = proc.stdout.readline().strip()
        assert writer, "the writer in the other namespace printed no id"
        (seg,) = [s for _, s in list_segments(tmp_path)]
        assert seg.writer == writer and seg.pid == 1  # pid 1 in its namespace: not ours
        assert writer_alive(seg)
        assert scan_file(tmp_path / seg.name).torn_tail
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # unshare is reaped; its child (pid 1 over there) finishes dying on its own schedule.
    deadline = time.monotonic() + 10
    while writer_alive(seg):
        assert time.monotonic() < deadline, "the killed writer's lock was never released"
        time.sleep(0.02)
    remove_segment(tmp_path / seg.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the dead writer's lock stayed"


def test_a_lock_file_never_appears_unlocked(tmp_path: Path) -> None:
    """take_writer_lock publishes the lock file already locked, and strays of dead writers are
    swept while a live writer's lock, or a fresh temporary one, is kept."""
    fd = take_writer_lock(tmp_path, "00000000000000aa")
    assert writer_lock_held(tmp_path / writer_lock_name("00000000000000aa"))
    dead = take_writer_lock(tmp_path, "00000000000000bb")
    os.close(dead)
    fresh_tmp = tmp_path / ".writer-00000000000000cc.lock.tmp"
    fresh_tmp.write_text("")
    old_tmp = tmp_path / ".writer-00000000000000dd.lock.tmp"
    old_tmp.write_text("")
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    assert sweep_writer_locks(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [writer_lock_name("00000000000000aa"), fresh_tmp.name])
    os.close(fd)


def test_a_writer_whose_lock_file_was_deleted_takes_a_new_id(tmp_path: Path) -> None:
    """If its lock file is deleted under it, the writer's next segment comes with a new id and
    lock, so readers never take it for dead."""
    w = SegmentWriter(tmp_path, max_segment_bytes=10)
    w.append(encode_frame(KIND_SPAN, b"one"))
    first = w.writer_id
    assert first is not None
    (tmp_path / writer_lock_name(first)).unlink()
    w.append(encode_frame(KIND_SPAN, b"two"))  # rotates: a new segment
    assert w.writer_id != first
    segs = {s.writer: s for _, s in list_segments(tmp_path)}
    second = w.writer_id or ""
    assert set(segs) == {first, second}
    assert writer_alive(segs[second]) and not writer_alive(segs[first])
    w.close()


def test_legacy_segments_are_listed_with_pid_liveness(tmp_path: Path) -> None:
    """A segment named by an earlier version is listed and judged by its pid and start time."""
    me = process_start_time(os.getpid())
    if me is None:
        pytest.skip("needs /proc")
    (tmp_path / segment_name(os.getpid(), me, 1)).write_bytes(encode_frame(KIND_SPAN, b"a"))
    (tmp_path / segment_name(os.getpid(), me + 1, 2)).write_bytes(encode_frame(KIND_SPAN, b"b"))
    alive = {s.starttime: writer_alive(s) for _, s in list_segments(tmp_path)}
    assert alive == {me: True, me + 1: False}


def test_parse_proc_stat_with_hostile_comm() -> None:
    """A comm containing spaces and parentheses does not shift the starttime field."""
    rest = " ".join(["S"] + [str(i) for i in range(4, 53)])  # fields 3..52; field 22 is "22"
    raw = f"4242 (evil) ) (name) {rest}\n".encode()  # comm is "evil) ) (name"
    assert _segments._parse_proc_stat(raw) == ("S", 22)
    assert _segments._parse_proc_stat(b"garbage") is None
    assert _segments._parse_proc_stat(b"1 (x) S 1 2") is None


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_process_start_time_matches_proc() -> None:
    """Our own start time is read from /proc and is stable."""
    st1 = process_start_time(os.getpid())
    assert isinstance(st1, int) and st1 == process_start_time(os.getpid())
    assert process_start_time(0) is None


def test_writer_alive_distinguishes_live_dead_zombie_and_reused_pid() -> None:
    """Alive needs pid and start time to match; a dead, zombie or reused pid is not alive."""
    me = process_start_time(os.getpid())
    if me is None:
        pytest.skip("needs /proc")
    assert writer_alive(SegmentId(os.getpid(), me, 0))
    assert not writer_alive(SegmentId(os.getpid(), me + 1, 0))  # same pid, other process
    assert not writer_alive(SegmentId(0, me, 0))
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    start = process_start_time(pid)
    deadline = time.monotonic() + 5
    while True:  # wait until it is a zombie (exited, not yet reaped)
        st_ = _segments._proc_stat(pid)
        if st_ is None or st_[0] == "Z" or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert start is not None
    assert not writer_alive(SegmentId(pid, start, 0))
    _reap(pid)
    assert not writer_alive(SegmentId(pid, start, 0))


def test_writer_alive_without_proc_uses_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc, liveness falls back to kill(pid, 0)."""
    monkeypatch.setattr(_segments, "_HAVE_PROC", False)
    assert writer_alive(SegmentId(os.getpid(), 0, 0))
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _reap(pid)
    assert not writer_alive(SegmentId(pid, 0, 0))


# --------------------------------------------------------------------------- directories


def test_ensure_spool_dir_creates_private_dirs_despite_umask(tmp_path: Path) -> None:
    """Missing directories (and parents) are created 0700 even under a permissive umask."""
    old = os.umask(0)
    try:
        d = ensure_spool_dir(tmp_path / "a" / "b" / "spool")
    finally:
        os.umask(old)
    for p in (d, d.parent, d.parent.parent):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700


def test_ensure_spool_dir_rejects_a_file(tmp_path: Path) -> None:
    """A path that is a file gives a SpoolError naming the path."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SpoolError, match=str(f)):
        ensure_spool_dir(f)


def test_ensure_spool_dir_rejects_a_directory_owned_by_someone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory another user owns (e.g. pre-created in /tmp) is refused with the fix named."""
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(SpoolError, match="CELERY_LANGFUSE_SPOOL_DIR"):
        ensure_spool_dir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_ensure_spool_dir_rejects_unwritable(tmp_path: Path) -> None:
    """An existing directory we cannot write gives a SpoolError."""
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    with pytest.raises(SpoolError, match="not writable"):
        ensure_spool_dir(d)


def test_default_spool_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """XDG_STATE_HOME wins, then ~/.local/state, then /tmp/celery-langfuse-{uid}."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_spool_dir() == tmp_path / "xdg" / "celery-langfuse" / "spool"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_spool_dir() == tmp_path / ".local/state/celery-langfuse/spool"
    monkeypatch.setenv("HOME", str(tmp_path / "nonexistent"))
    assert default_spool_dir() == Path(f"/tmp/celery-langfuse-{os.getuid()}/spool")


# --------------------------------------------------------------------------- writer


def test_writer_is_lazy_and_creates_0600_files_in_a_0700_dir(tmp_path: Path) -> None:
    """No file before the first append; then one 0600 segment named after this process."""
    spool = tmp_path / "spool"
    old = os.umask(0)
    try:
        w = SegmentWriter(spool)
        assert list(spool.iterdir()) == [] and w.current_path is None
        w.append(encode_frame(KIND_SPAN, b"one"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    path = w.current_path
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    seg = parse_segment_name(path.name)
    assert seg is not None and seg.pid == os.getpid() and seg.writer == w.writer_id
    lock = spool / writer_lock_name(seg.writer)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    cursor = cursor_path(path)  # reserved with the segment (see the cursor file spec)
    assert stat.S_IMODE(cursor.stat().st_mode) == 0o600
    assert sorted(p.name for p in spool.iterdir()) == sorted([path.name, lock.name, cursor.name])
    w.close()


def test_writer_rotation_seals_old_segments_and_keeps_order(tmp_path: Path) -> None:
    """Past max_segment_bytes the writer moves to seq+1, sealing the old segment; nothing lost."""
    w = SegmentWriter(tmp_path, max_segment_bytes=200)
    payloads = [bytes([i]) * 50 for i in range(10)]
    for p in payloads:
        w.append(encode_frame(KIND_SPAN, p))
    segs = list_segments(tmp_path)
    assert len(segs) >= 3
    seqs = [s.seq for _, s in segs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    got = []
    for i, (path, _) in enumerate(segs):
        r = scan_file(path)
        assert r.corrupt == [] and not r.torn_tail
        assert r.sealed == (i < len(segs) - 1)  # every segment but the current one is sealed
        assert path.stat().st_size <= 200 + HEADER_SIZE
        got += [x.payload for x in r.records if x.kind == KIND_SPAN]
    assert got == payloads
    w.close()
    assert scan_file(segs[-1][0]).sealed and w.current_path is None
    w.append(encode_frame(KIND_SPAN, b"after close"))
    assert w.current_path is not None and w.current_path != segs[-1][0]
    w.close()


def test_writer_threads_never_interleave(tmp_path: Path) -> None:
    """Concurrent appends from many threads all land whole, with no corruption."""
    w = SegmentWriter(tmp_path, max_segment_bytes=4096)

    def work(t: int) -> None:
        for i in range(200):
            w.append(encode_frame(KIND_SPAN, f"{t}:{i}".encode() * 5))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    seen = []
    for path, _ in list_segments(tmp_path):
        r = scan_file(path)
        assert r.corrupt == [] and not r.torn_tail
        seen += [x.payload for x in r.records if x.kind == KIND_SPAN]
    assert sorted(seen) == sorted(f"{t}:{i}".encode() * 5 for t in range(8) for i in range(200))


def test_forked_child_writes_its_own_segment(tmp_path: Path) -> None:
    """A forked child appends to a new segment named after its pid; the parent's stays intact."""
    w = SegmentWriter(tmp_path)
    w.append(encode_frame(KIND_SPAN, b"parent-1"))
    parent_path = w.current_path
    assert parent_path is not None
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            w.append(encode_frame(KIND_SPAN, b"child-1"))
            w.append(encode_frame(KIND_SPAN, b"child-2"))
            ok = w.current_path != parent_path and w.current_path is not None
            code = 0 if ok else 2
        finally:
            os._exit(code)
    assert _reap(pid) == 0
    w.append(encode_frame(KIND_SPAN, b"parent-2"))
    assert w.current_path == parent_path
    r = scan_file(parent_path)
    assert [x.payload for x in r.records] == [b"parent-1", b"parent-2"] and r.corrupt == []
    child = [(p, s) for p, s in list_segments(tmp_path) if s.pid == pid]
    assert len(child) == 1
    assert [x.payload for x in scan_file(child[0][0]).records] == [b"child-1", b"child-2"]
    w.close()


def test_fork_without_python_hooks_is_detected_by_pid(tmp_path: Path) -> None:
    """A C-level fork() (no at-fork hooks) is caught on append by the pid check."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        pytest.skip("no libc")
    # PyDLL, not CDLL: the call keeps the GIL, so the child never starts with the GIL held
    # by a thread of the parent's that does not exist in it (the test process has many).
    libc = ctypes.PyDLL(libc_name, use_errno=True)
    w = SegmentWriter(tmp_path)
    w.append(encode_frame(KIND_SPAN, b"parent"))
    parent_path = w.current_path
    pid = libc.fork()
    if pid == 0:
        code = 1
        try:
            w.append(encode_frame(KIND_SPAN, b"child"))
            code = 0 if w.current_path != parent_path else 2
        finally:
            os._exit(code)
    assert pid > 0
    assert _reap(pid) == 0
    assert parent_path is not None
    assert [x.payload for x in scan_file(parent_path).records] == [b"parent"]
    child = [p for p, s in list_segments(tmp_path) if s.pid == pid]
    assert [x.payload for x in scan_file(child[0]).records] == [b"child"]
    w.close()


def _short_then_enospc(real_write):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def flaky(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return int(real_write(fd, bytes(data)[:5]))  # short write
        raise OSError(errno.ENOSPC, "No space left on device")

    return flaky


def test_partial_write_failure_is_truncated_back_to_the_last_whole_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write a full disk cuts short raises, leaves no torn bytes, and the segment goes on."""
    w = SegmentWriter(tmp_path)
    w.append(encode_frame(KIND_SPAN, b"before"))
    first = w.current_path
    assert first is not None
    size = first.stat().st_size
    real_write = os.write
    monkeypatch.setattr(os, "write", _short_then_enospc(real_write))
    with pytest.raises(OSError):
        w.append(encode_frame(KIND_SPAN, b"torn" * 10))
    monkeypatch.setattr(os, "write", real_write)
    assert first.stat().st_size == size
    w.append(encode_frame(KIND_SPAN, b"after"))
    assert w.current_path == first
    r = scan_file(first)
    assert [x.payload for x in r.records] == [b"before", b"after"]
    assert not r.corrupt and not r.torn_tail
    w.close()


def test_partial_write_failure_moves_to_a_new_segment_when_it_cannot_truncate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the cut-short write cannot be truncated away, the next append rotates."""
    w = SegmentWriter(tmp_path)
    w.append(encode_frame(KIND_SPAN, b"before"))
    first = w.current_path
    real_write = os.write

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EPERM, "not permitted")

    monkeypatch.setattr(os, "write", _short_then_enospc(real_write))
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(OSError):
        w.append(encode_frame(KIND_SPAN, b"torn" * 10))
    monkeypatch.setattr(os, "write", real_write)
    w.append(encode_frame(KIND_SPAN, b"after"))
    assert first is not None and w.current_path != first
    r = scan_file(first)
    assert [x.payload for x in r.records if x.kind == KIND_SPAN] == [b"before"]
    assert r.sealed and len(r.corrupt) == 1  # the torn bytes, then the seal
    w.close()


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.write returning fewer bytes than asked is looped until the whole batch is written."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:3]))
    w = SegmentWriter(tmp_path)
    frames = encode_frame(KIND_SPAN, b"a" * 20) + encode_frame(KIND_SPAN, b"b" * 20)
    assert w.append(frames) == len(frames)
    monkeypatch.setattr(os, "write", real_write)
    assert w.current_path is not None
    assert [x.payload for x in scan_file(w.current_path).records] == [b"a" * 20, b"b" * 20]
    w.close()


def test_writer_recreates_a_vanished_directory(tmp_path: Path) -> None:
    """If the spool directory is removed before the first segment opens, it is recreated."""
    spool = tmp_path / "spool"
    w = SegmentWriter(spool)
    spool.rmdir()
    w.append(encode_frame(KIND_SPAN, b"x"))
    assert w.current_path is not None and w.current_path.parent == spool
    w.close()


# --------------------------------------------------------------------------- cursors, size


def test_cursor_round_trip_missing_and_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cursors round-trip, default to 0, read a corrupt file as 0 with a warning, are 0600."""
    seg = tmp_path / segment_name(1, 2, 3)
    assert read_cursor(seg) == 0
    write_cursor(seg, 12345)
    assert read_cursor(seg) == 12345
    assert stat.S_IMODE(cursor_path(seg).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [seg.name + ".cursor"]  # no temp file left
    cursor_path(seg).write_bytes(b"12\x0034")
    with caplog.at_level(logging.WARNING, logger="tracing.spool"):
        assert read_cursor(seg) == 0
    assert "corrupt" in caplog.text
    with pytest.raises(ValueError):
        write_cursor(seg, -1)


def test_spool_size_counts_unshipped_bytes_and_remove_segment(tmp_path: Path) -> None:
    """spool_size is segment sizes minus cursors; remove_segment deletes segment and cursor."""
    w = SegmentWriter(tmp_path)
    w.append(encode_frame(KIND_SPAN, b"a" * 89))  # 100 bytes
    assert spool_size(tmp_path) == 100
    assert w.current_path is not None
    write_cursor(w.current_path, 40)
    assert spool_size(tmp_path) == 60
    w.close()
    path = list_segments(tmp_path)[0][0]
    remove_segment(path)
    # Only the live writer's lock is left: it may append again.
    assert [p.name for p in tmp_path.iterdir()] == [writer_lock_name(w.writer_id or "")]
    assert spool_size(tmp_path) == 0
    remove_segment(path)  # idempotent


def test_list_segments_oldest_first_ignores_others(tmp_path: Path) -> None:
    """Segments are listed by mtime then name; cursors, locks and strangers are skipped."""
    names = [segment_name(9, 1, 2), segment_name(5, 1, 0), segment_name(7, 1, 1)]
    for i, n in enumerate(names):
        p = tmp_path / n
        p.write_bytes(b"")
        os.utime(p, ns=(1_000_000_000 * (10 - i), 1_000_000_000 * (10 - i)))
    (tmp_path / (names[0] + ".cursor")).write_text("0")
    (tmp_path / "shipper.lock").write_text("")
    assert [p.name for p, _ in list_segments(tmp_path)] == list(reversed(names))
    assert list_segments(tmp_path / "missing") == []


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_round_trip(tmp_path: Path) -> None:
    """Dead letters store framed payloads and a reason sidecar; read_dead_letters reads both."""
    p = write_dead_letter(tmp_path, [b"one", b"two"], "400: invalid span")
    assert p.parent == tmp_path / "dead-letter"
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    sidecar = json.loads(p.with_name(p.name.replace(".spool", ".reason.json")).read_text())
    assert sidecar["reason"] == "400: invalid span" and sidecar["count"] == 2
    write_dead_letter(tmp_path, [b"three"], "second")
    dls = read_dead_letters(tmp_path)
    assert [d.reason for d in dls] == ["400: invalid span", "second"]
    assert dls[0].payloads == [b"one", b"two"] and dls[0].records[0].kind == KIND_SPAN
    assert dls[0].time > 0
    assert list_segments(tmp_path) == []  # dead letters are never shipped as segments
    assert read_dead_letters(tmp_path / "none") == []


# --------------------------------------------------------------------------- shipper lock


def _lock_probe(spool: Path) -> str:
    """Try the shipper lock from a fresh process; return 'GOT' or 'BUSY'."""
    code = textwrap.dedent(
        f"""
        from tracing.spool import ShipperLock
        print("GOT" if ShipperLock({str(spool)!r}).acquire() else "BUSY")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _raw_flock_probe(path: Path) -> str:
    """Try flock on a file from a fresh process without our code; 'GOT' or 'BUSY'."""
    code = textwrap.dedent(
        f"""
        import fcntl, os
        fd = os.open({str(path)!r}, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("GOT")
        except BlockingIOError:
            print("BUSY")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_shipper_lock_excludes_others_and_releases(tmp_path: Path) -> None:
    """A held lock keeps out a second lock object and another process until released."""
    a, b = ShipperLock(tmp_path), ShipperLock(tmp_path)
    assert a.acquire() and a.held and a.acquire()  # re-acquire by the holder is a no-op
    assert not b.acquire() and not b.held
    assert _lock_probe(tmp_path) == "BUSY"
    assert (tmp_path / "shipper.lock").read_text().strip() == str(os.getpid())
    assert stat.S_IMODE((tmp_path / "shipper.lock").stat().st_mode) == 0o600
    a.release()
    assert not a.held
    assert b.acquire()
    b.release()
    assert _lock_probe(tmp_path) == "GOT"


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A subprocess that holds the shipper lock on tmp_path and sleeps (killed on teardown)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from tracing.spool import ShipperLock
        lock = ShipperLock({str(tmp_path)!r})
        assert lock.acquire()
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_shipper_lock_freed_when_holder_is_sigkilled(
    tmp_path: Path, lock_holder: subprocess.Popen[str]
) -> None:
    """Another process cannot take the lock while its holder runs, and can once it is SIGKILLed."""
    mine = ShipperLock(tmp_path)
    assert not mine.acquire()
    os.kill(lock_holder.pid, signal.SIGKILL)
    lock_holder.wait()
    assert mine.acquire()
    mine.release()


def test_flock_across_fork_close_keeps_lock_but_unlock_would_release(tmp_path: Path) -> None:
    """Verifies the fork claim: a child closing its inherited copy keeps the parent's lock, a
    child's LOCK_UN would drop it for both, which is why the at-fork hook closes and never unlocks.
    """
    lock = ShipperLock(tmp_path)
    assert lock.acquire()
    path = tmp_path / "shipper.lock"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # The at-fork hook already closed the child's copy of the descriptor.
            code = 0 if (lock._fd is None and not lock.held) else 2
        finally:
            os._exit(code)
    assert _reap(pid) == 0
    assert lock.held and _raw_flock_probe(path) == "BUSY"
    # Counter-experiment with a raw descriptor: LOCK_UN in a child releases the parent's lock.
    raw = os.open(path, os.O_RDWR)
    lock.release()
    fcntl.flock(raw, fcntl.LOCK_EX | fcntl.LOCK_NB)
    pid = os.fork()
    if pid == 0:
        try:
            fcntl.flock(raw, fcntl.LOCK_UN)
        finally:
            os._exit(0)
    _reap(pid)
    assert _raw_flock_probe(path) == "GOT"
    os.close(raw)


def test_lock_does_not_outlive_a_killed_holder_through_its_children(tmp_path: Path) -> None:
    """A holder that forked a long-lived child and is then SIGKILLed leaves the lock free."""
    code = textwrap.dedent(
        f"""
        import os, time
        from tracing.spool import ShipperLock
        lock = ShipperLock({str(tmp_path)!r})
        assert lock.acquire()
        child = os.fork()
        if child == 0:
            time.sleep(60)   # an orphaned pool child that outlives its parent
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        assert _lock_probe(tmp_path) == "BUSY"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child is still running
        assert _lock_probe(tmp_path) == "GOT"
    finally:
        _kill_quietly(child)
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def _kill_quietly(pid: int) -> None:
    """SIGKILL a pid this test started, ignoring that it may be gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_record_is_frozen() -> None:
    """Records are immutable values."""
    r = Record(0, 11, KIND_SEAL, b"")
    with pytest.raises(AttributeError):
        r.kind = 1  # type: ignore[misc]


def test_at_fork_hook_of_a_collected_writer_is_skipped(tmp_path: Path) -> None:
    """A garbage-collected writer's at-fork hook does nothing (no TypeError in every child)."""
    import gc
    import weakref

    w = SegmentWriter(tmp_path)
    ref = weakref.WeakMethod(w._after_fork_in_child)
    del w
    gc.collect()
    assert ref() is None
    _segments._call_if_alive(ref)  # must not raise
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert _reap(pid) == 0

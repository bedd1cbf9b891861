"""The spool's state that must survive a full disk: fixed-size cursors written in place, the
drop ledger, the status file, punching shipped bytes out, and a reader whose cursor cannot
be written. Plain files on the test's temporary directory; no processes."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from tracing.shipping._reader import Item, SpoolReader
from tracing.shipping._status import (
    STATUS_FILE,
    STATUS_FILE_SIZE,
    ShipperStats,
    read_status,
    reserve_status,
    write_status,
)
from tracing.spool import KIND_SPAN, SegmentWriter, cursor_path, encode_frame, read_cursor
from tracing.spool._cursors import CURSOR_FILE_SIZE, reserve_cursor, write_cursor
from tracing.spool._drops import (
    ANY_WRITER,
    LEDGER_SIZE,
    ledger_path,
    read_ledger,
    record_drops,
    reserve_ledger,
    totals_by_cause,
)
from tracing.spool._format import lost_records
from tracing.spool._space import PAGE, punch_prefix, punchable


def segment(tmp_path: Path, size: int = 0) -> Path:
    path = tmp_path / "seg-w0123456789abcdef-1-000000.spool"
    path.write_bytes(b"\x01" * size)
    return path


# --------------------------------------------------------------------------- cursors


def test_a_reserved_cursor_is_updated_in_place_in_alternate_slots(tmp_path):
    """A reserved cursor keeps its size and inode through every write (no allocation, no
    rename), and each write leaves the previous value in the other slot."""
    seg = segment(tmp_path)
    assert reserve_cursor(seg) == 0
    path = cursor_path(seg)
    inode = path.stat().st_ino
    for offset in (100, 250, 4096, 10**12):
        write_cursor(seg, offset)
        assert read_cursor(seg) == offset
        assert path.stat().st_size == CURSOR_FILE_SIZE and path.stat().st_ino == inode
    raw = path.read_bytes()
    assert b"%020d" % 4096 in raw and b"%020d" % 10**12 in raw


def test_a_torn_slot_leaves_the_other_value(tmp_path):
    """A cursor write cut short (garbage in one slot) reads as the other slot's value, and
    the next write goes over the damaged slot."""
    seg = segment(tmp_path)
    reserve_cursor(seg)
    write_cursor(seg, 500)
    write_cursor(seg, 900)
    path = cursor_path(seg)
    raw = bytearray(path.read_bytes())
    newest = raw.index(b"%020d" % 900)
    raw[newest + 5] = ord("x")
    path.write_bytes(bytes(raw))
    assert read_cursor(seg) == 500
    write_cursor(seg, 1000)
    assert read_cursor(seg) == 1000 and b"%020d" % 500 in path.read_bytes()


def test_cursors_of_earlier_versions_are_read_and_rewritten_fixed(tmp_path):
    """``{offset}\\n`` (written by earlier versions) reads as before; reserving rewrites it
    in the fixed form with the same offset."""
    seg = segment(tmp_path)
    cursor_path(seg).write_bytes(b"12345\n")
    assert read_cursor(seg) == 12345
    assert reserve_cursor(seg) == 12345
    assert cursor_path(seg).stat().st_size == CURSOR_FILE_SIZE and read_cursor(seg) == 12345


def test_no_cursor_is_reserved_for_a_segment_that_is_gone(tmp_path):
    """Reserving the cursor of a removed segment raises instead of leaving a stray file."""
    with pytest.raises(FileNotFoundError):
        reserve_cursor(tmp_path / "seg-w0123456789abcdef-1-000001.spool")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_reserves_each_segments_cursor_first(tmp_path):
    """Every segment a writer creates has its fixed-size cursor from the start."""
    writer = SegmentWriter(tmp_path)
    writer.append(encode_frame(KIND_SPAN, b"x"))
    assert writer.current_path is not None
    assert cursor_path(writer.current_path).stat().st_size == CURSOR_FILE_SIZE
    writer.close()


def test_a_commit_whose_cursor_cannot_be_written_is_kept_in_memory(tmp_path, monkeypatch, caplog):
    """After a successful send, a cursor write failing with ENOSPC raises nothing: the
    reader's cursor moves (nothing is resent by this shipper), counted and logged once."""
    seg = segment(tmp_path, 300)
    stats = ShipperStats()
    reader = SpoolReader(tmp_path, stats)
    assert reader.cursor(seg) == 0

    def full(segment: object, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tracing.shipping._reader.write_cursor", full)
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        reader.commit([Item(seg, 100)])
        reader.commit([Item(seg, 200)])
    assert reader.cursor(seg) == 200 and read_cursor(seg) == 0
    assert stats.cursor_write_failures == 2
    assert caplog.text.count("cannot write the shipping cursor") == 1


# --------------------------------------------------------------------------- drop ledger


def test_drop_ledger_counts_by_writer_and_cause_in_place(tmp_path):
    """Drops add up per (writer, cause) in a file of fixed size, updated in place."""
    assert reserve_ledger(tmp_path)
    path = ledger_path(tmp_path)
    inode = path.stat().st_ino
    assert record_drops(tmp_path, "0123456789abcdef", {"disk_full": 3})
    assert record_drops(tmp_path, "0123456789abcdef", {"disk_full": 2, "unencodable": 1})
    assert record_drops(tmp_path, None, {"disk_full": 4})
    assert read_ledger(tmp_path) == {("0123456789abcdef", "disk_full"): 5,
                                     ("0123456789abcdef", "unencodable"): 1,
                                     (ANY_WRITER, "disk_full"): 4}
    assert totals_by_cause(read_ledger(tmp_path)) == {"disk_full": 9, "unencodable": 1}
    assert path.stat().st_size == LEDGER_SIZE and path.stat().st_ino == inode


def test_a_full_ledger_folds_writers_and_keeps_every_count(tmp_path):
    """When no line is left for a new writer, lines fold into the unknown writer's, per
    cause: no count is lost."""
    for i in range(200):
        assert record_drops(tmp_path, f"{i:016x}", {"disk_full": 1})
    assert totals_by_cause(read_ledger(tmp_path)) == {"disk_full": 200}
    assert ledger_path(tmp_path).stat().st_size == LEDGER_SIZE


def test_a_ledger_that_cannot_be_created_answers_false(tmp_path):
    """No ledger and no way to create one: record_drops says so instead of raising."""
    missing = tmp_path / "missing"
    assert not record_drops(missing, None, {"disk_full": 1})


# --------------------------------------------------------------------------- status file


def test_status_is_overwritten_in_place_and_stays_readable(tmp_path):
    """A reserved status file keeps its size and inode through updates; it reads as JSON."""
    reserve_status(tmp_path)
    path = tmp_path / STATUS_FILE
    inode = path.stat().st_ino
    assert read_status(tmp_path) == {}
    write_status(tmp_path, ShipperStats(shipped_spans=7, lost_spans=3))
    write_status(tmp_path, ShipperStats(shipped_spans=8, lost_spans=3))
    status = read_status(tmp_path) or {}
    assert status["shipped_spans"] == 8 and status["lost_spans"] == 3
    assert path.stat().st_size == STATUS_FILE_SIZE and path.stat().st_ino == inode


def test_a_status_bigger_than_the_file_is_written_whole(tmp_path):
    """A status that outgrows the reserved size replaces the file with a larger one."""
    reserve_status(tmp_path)
    stats = ShipperStats(dropped_in_writers={f"cause{i}": i for i in range(2000)})
    write_status(tmp_path, stats)
    status = read_status(tmp_path) or {}
    assert len(status["dropped_in_writers"]) == 2000
    assert json.dumps(status)  # whole, valid JSON


# --------------------------------------------------------------------------- punching, counting


def test_punching_frees_whole_pages_and_keeps_size_and_mtime(tmp_path):
    """The page-aligned prefix is freed; size, later bytes and mtime stay."""
    seg = segment(tmp_path, 5 * PAGE + 100)
    os.utime(seg, ns=(1_000_000_000, 2_000_000_000))
    blocks = seg.stat().st_blocks
    if not punch_prefix(seg, punchable(3 * PAGE + 10)):
        pytest.skip("this filesystem cannot punch holes")
    st = seg.stat()
    data = seg.read_bytes()
    assert st.st_size == 5 * PAGE + 100 and st.st_mtime_ns == 2_000_000_000
    assert data[: 3 * PAGE] == bytes(3 * PAGE) and data[3 * PAGE :] == b"\x01" * (2 * PAGE + 100)
    assert st.st_blocks < blocks


def test_lost_records_counts_the_headers_in_unreadable_bytes():
    """Frames that start in bad bytes are counted by kind; bytes with no header count as one
    unknown record; zeros (a punched hole) count as nothing."""
    span, other = encode_frame(KIND_SPAN, b"a" * 50), encode_frame(2, b"{}")
    assert lost_records(span[:30] + span[:40] + other[:5]) == {KIND_SPAN: 2}
    assert lost_records(b"garbage") == {0: 1}
    assert lost_records(bytes(4096)) == {}


def test_an_index_that_finds_a_punched_hole_takes_its_attempts_as_closed(tmp_path):
    """The worker's main process reads segments on its own: an attempt it saw open whose
    span was then shipped and punched out (zeros now) is closed, not left open for a later
    WorkerLostError of the same task id to close again."""
    from tracing.spool._attempts import AttemptIndex, OpenAttempt

    attempt = OpenAttempt(task_id="t1", name="t.x", trace_id="ab" * 16, span_id="cd" * 8,
                          parent_span_id=None, start_ns=1, attributes={})
    writer = SegmentWriter(tmp_path)
    writer.append(attempt.frame())
    main_index = AttemptIndex(tmp_path, alive=lambda segment: True)
    main_index.refresh()
    assert main_index.find_task("t1") is not None
    span = encode_frame(KIND_SPAN, bytes.fromhex("cd" * 8) + bytes(16) + b"\x02" * 5000)
    writer.append(span + encode_frame(KIND_SPAN, bytes(24) + b"later"))
    seg = writer.current_path
    assert seg is not None
    if not punch_prefix(seg, punchable(seg.stat().st_size - 40)):
        pytest.skip("this filesystem cannot punch holes")
    main_index.refresh()
    assert main_index.find_task("t1") is None and main_index.was_closed("t1")
    writer.close()


@pytest.mark.parametrize("damage", ["corrupt", "cut", "not stored", "none"])
def test_an_orphan_is_closed_with_what_the_spool_knows(tmp_path, damage):
    """A dead writer's open attempt is closed as "span record unreadable" when corrupt bytes
    or an unfinished record follow it, "span record not stored" when its writer counted
    drops in the ledger, and "worker lost" only when nothing else is known."""
    from tracing.spool._attempts import (
        SPAN_CUT,
        SPAN_UNREADABLE,
        WORKER_LOST,
        AttemptIndex,
        OpenAttempt,
        orphan_reason,
    )

    attempt = OpenAttempt(task_id="t1", name="t.x", trace_id="ab" * 16, span_id="cd" * 8,
                          parent_span_id=None, start_ns=1, attributes={})
    writer = SegmentWriter(tmp_path)
    span = encode_frame(KIND_SPAN, bytes.fromhex("cd" * 8) + bytes(16) + b"\x02" * 50)
    after = encode_frame(KIND_SPAN, bytes(24) + b"other")
    writer.append(attempt.frame())
    if damage == "corrupt":
        writer.append(span[:-3] + b"xyz" + after)
    elif damage == "cut":
        writer.append(span[:-10])
    elif damage == "not stored":
        record_drops(tmp_path, writer.writer_id, {"disk_full": 2})
    index = AttemptIndex(tmp_path, alive=lambda segment: False)
    index.refresh()
    [orphan] = index.orphans(0.0)
    expected = {"corrupt": SPAN_UNREADABLE, "cut": SPAN_CUT, "none": WORKER_LOST}
    reason = orphan_reason(index, orphan, tmp_path)
    if damage == "not stored":
        assert reason.startswith("span record not stored") and "disk_full: 2" in reason
    else:
        assert reason == expected[damage]
    writer.close()

"""The shipper against the loopback receiver: poison spans, corruption, the disk cap.

Spans are made by the real Langfuse SDK and written by the real spool exporter; the shipper
sends them over real HTTP. These rows need no worker, so they run in-process.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from langfuse import Langfuse
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracing import _sdk, load_config
from tracing.shipping._delivery import SendResult
from tracing.shipping._shipper import Shipper
from tracing.spool import (
    KIND_SPAN,
    SegmentWriter,
    ShipperLock,
    encode_frame,
    list_segments,
    read_dead_letters,
    scan_file,
    segment_name,
    span_payload,
)
from tracing.spool._exporter import SpoolExporter
from tracing.testing import LangfuseReceiver


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_spans(receiver: LangfuseReceiver, spool: Path) -> Iterator[object]:
    """Write ``n`` real SDK spans (named ``span-<i>``) into the spool; returns their ids."""
    key = f"pk-lf-{uuid.uuid4().hex[:8]}"
    exporter = SpoolExporter(SegmentWriter(spool))
    client = Langfuse(public_key=key, secret_key="sk", base_url=receiver.base_url,
                      span_exporter=exporter, tracer_provider=TracerProvider(), flush_at=2000)

    def make(n: int, payload_bytes: int = 0) -> list[str]:
        ids = []
        for i in range(n):
            # random, so gzip cannot shrink it below the size being tested
            payload = os.urandom(payload_bytes // 2).hex() if payload_bytes else None
            obs = client.start_observation(name=f"span-{i}", input=payload)
            obs.end()
            ids.append(obs.id)
        client.flush()
        return ids

    yield make
    client.shutdown()
    _sdk.forget_client(key)


def shipper_for(receiver: LangfuseReceiver, spool: Path, **options: object) -> Shipper:
    config = load_config(
        environ={}, public_key=receiver.public_key, secret_key=receiver.secret_key,
        base_url=receiver.base_url, spool_dir=str(spool), **options,
    )
    return Shipper(config, SpoolExporter(SegmentWriter(spool)))


def as_dead_writer(spool: Path) -> list[Path]:
    """Rename this process's segments as if a process that no longer exists wrote them."""
    renamed = []
    for path, segment in list_segments(spool):
        target = path.with_name(segment_name(segment.pid, 1, segment.seq))
        path.rename(target)
        renamed.append(target)
    return renamed


def test_each_span_is_sent_once_and_never_again(receiver, spool, make_spans):
    """After a 2xx the records are done: a second drain sends nothing."""
    ids = make_spans(30)
    shipper_for(receiver, spool).drain(10)
    shipper_for(receiver, spool).drain(2)
    assert sorted(o.id for o in receiver.observations) == sorted(ids)
    assert receiver.duplicates() == {}
    assert len(receiver.trace_requests) == 1


def test_one_poison_span_in_a_batch_of_100(receiver, spool, make_spans):
    """Langfuse's 400 for one bad span: 99 delivered, the poison one dead-lettered."""
    ids = make_spans(100)
    receiver.set_poison(lambda span: span["name"] == "span-42")
    stats = shipper_for(receiver, spool).drain(20)
    delivered = {o.id for o in receiver.observations}
    assert len(delivered) == 99 and ids[42] not in delivered
    assert stats.dead_lettered == 1
    [letter] = read_dead_letters(spool)
    assert "HTTP 400" in letter.reason and letter.payloads[0][:8].hex() == ids[42]
    assert receiver.duplicates() == {}
    assert len(receiver.trace_requests) <= 2 * 7 + 1  # halving: O(log n) requests


def test_oversized_request_is_split(receiver, spool, make_spans):
    """A batch over the receiver's size limit (413) is split until each part fits."""
    receiver.stop()
    small = LangfuseReceiver(public_key=receiver.public_key, secret_key=receiver.secret_key,
                             max_request_bytes=40_000)
    with small:
        ids = make_spans(40, payload_bytes=3000)
        shipper_for(small, spool).drain(20)
        assert sorted(o.id for o in small.observations) == sorted(ids)
        assert any(r.status == 413 for r in small.trace_requests)
        assert small.duplicates() == {}


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 200])
def test_truncated_segment_ships_its_whole_records(receiver, spool, make_spans, cut, caplog):
    """A segment cut mid-record (writer killed) ships every whole record, skips the tail and
    counts the span record it held as unreadable."""
    make_spans(20)
    [segment] = as_dead_writer(spool)
    records = scan_file(segment).records
    size = segment.stat().st_size
    os.truncate(segment, size - cut)
    whole = [r for r in records if r.end <= size - cut]
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        stats = shipper_for(receiver, spool).drain(10)
    assert sorted(o.id for o in receiver.observations) == sorted(
        r.payload[:8].hex() for r in whole)
    assert stats.torn_tails == 1 and "never finished" in caplog.text
    assert stats.unreadable_spans == stats.lost_spans == 1  # the cut record was a span
    assert list_segments(spool) == []  # done and its writer is dead: removed


def test_bit_flip_in_a_middle_record(receiver, spool, make_spans, caplog):
    """A record with a bad checksum is set aside and counted; the others are shipped."""
    ids = make_spans(20)
    [segment] = as_dead_writer(spool)
    victim = scan_file(segment).records[10]
    data = bytearray(segment.read_bytes())
    data[victim.offset + 30] ^= 0x10
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        stats = shipper_for(receiver, spool).drain(10)
    delivered = sorted(o.id for o in receiver.observations)
    assert delivered == sorted(i for i in ids if i != victim.payload[:8].hex())
    assert stats.corrupt_records == 1 and "corrupt bytes" in caplog.text
    assert stats.unreadable_spans == 1  # the span record in those bytes is counted
    assert any("corrupt" in letter.reason for letter in read_dead_letters(spool))


def test_spool_cap_drops_the_oldest_and_says_so(receiver, spool, make_spans, caplog):
    """Past the size cap the oldest records are dropped, counted and logged."""
    ids = make_spans(200, payload_bytes=1000)
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        stats = shipper_for(receiver, spool, spool_max_bytes=64 * 1024).drain(20)
    delivered = [o.id for o in receiver.observations]
    assert stats.dropped_at_cap > 0
    assert len(delivered) + stats.dropped_at_cap == 200
    assert set(delivered) == set(ids[-len(delivered):]), "the newest are kept"
    assert "CELERY_LANGFUSE_SPOOL_MAX_BYTES" in caplog.text


def test_drain_is_bounded_when_langfuse_is_down(receiver, spool, make_spans):
    """With Langfuse unreachable a drain gives up at its timeout and keeps every record."""
    make_spans(10)
    receiver.down()
    started = time.monotonic()
    stats = shipper_for(receiver, spool).drain(1.0)
    assert time.monotonic() - started < 3
    assert stats.shipped_spans == 0
    kept = sum(1 for path, _ in list_segments(spool)
               for r in scan_file(path).records if r.kind == KIND_SPAN)
    assert kept == 10


def test_second_shipper_is_kept_out_by_the_lock(receiver, spool, make_spans):
    """While one shipper holds a spool, another cannot drain it."""
    make_spans(1)
    first = shipper_for(receiver, spool)
    assert first._acquire()
    with pytest.raises(RuntimeError, match="another shipper"):
        shipper_for(receiver, spool).drain(1)
    first._release()
    shutil.rmtree(spool / "dead-letter", ignore_errors=True)


def test_closing_span_keeps_a_non_error_end_out_of_error_status():
    """A task revoked by termination is closed as WARNING/REVOKED, not as an OTel error."""
    from opentelemetry.trace import StatusCode

    from tracing.spool._attempts import OpenAttempt, closing_span

    attempt = OpenAttempt(task_id="t", name="t.x", trace_id="ab" * 16, span_id="cd" * 8,
                          parent_span_id=None, start_ns=1, attributes={})
    revoked = closing_span(attempt, "revoked: terminated by signal 15", level="WARNING",
                           final_state="REVOKED")
    assert revoked.status.status_code is StatusCode.UNSET
    assert revoked.attributes["langfuse.observation.level"] == "WARNING"
    assert revoked.attributes["langfuse.observation.metadata.final_state"] == '"REVOKED"'
    lost = closing_span(attempt, "worker lost")
    assert lost.status.status_code is StatusCode.ERROR


def test_stop_keeps_the_lock_while_a_send_is_still_in_flight(receiver, spool, make_spans):
    """A stop whose join times out mid-send keeps the spool lock until that send ends, so a
    second shipper cannot send the same records (issue 12)."""
    make_spans(3)
    entered, release = threading.Event(), threading.Event()

    class Stuck:
        def send(self, body: bytes, timeout: float) -> SendResult:
            entered.set()
            release.wait(10)
            return SendResult(200)

        def close(self) -> None:
            pass

    config = load_config(environ={}, public_key=receiver.public_key,
                         secret_key=receiver.secret_key, base_url=receiver.base_url,
                         spool_dir=str(spool), http_timeout=0.1)
    shipper = Shipper(config, SpoolExporter(SegmentWriter(spool)), transport=Stuck())
    shipper.start()
    assert entered.wait(5)
    shipper.stop(0.1)  # returns with the thread still inside send()
    other = ShipperLock(spool)
    try:
        assert not other.acquire(), "lock released while a send was in flight"
        release.set()
        assert shipper._thread is not None
        shipper._thread.join(5)
        assert other.acquire()
    finally:
        release.set()
        other.release()


def old_span_frame(span: ReadableSpan) -> bytes:
    """The previous version's encoder: a KIND_SPAN record holding a one-span OTLP request."""
    context = span.get_span_context()
    otlp = encode_spans([span]).SerializeToString()
    return encode_frame(KIND_SPAN, span_payload(
        context.span_id.to_bytes(8, "big"), context.trace_id.to_bytes(16, "big"), otlp))


@pytest.fixture
def old_spool_spans(spool: Path) -> Iterator[Callable[[int], list[str]]]:
    """Write ``n`` real SDK spans with the previous version's encoder, as a dead writer."""
    key = f"pk-lf-{uuid.uuid4().hex[:8]}"
    captured: list[ReadableSpan] = []

    class Capture(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            captured.extend(spans)
            return SpanExportResult.SUCCESS

    client = Langfuse(public_key=key, secret_key="sk", base_url="http://127.0.0.1:9",
                      span_exporter=Capture(), tracer_provider=TracerProvider())

    def make(n: int) -> list[str]:
        for i in range(n):
            client.start_observation(name=f"old-{i}").end()
        client.flush()
        spool.mkdir(mode=0o700, exist_ok=True)
        old = spool / segment_name(2**22 + 7, 1, 0)  # a pid-named segment, writer long gone
        old.write_bytes(b"".join(old_span_frame(span) for span in captured))
        return [f"{span.context.span_id:016x}" for span in captured]

    yield make
    client.shutdown()
    _sdk.forget_client(key)


def test_a_spool_written_by_the_previous_version_ships_after_upgrade(
        receiver, spool, make_spans, old_spool_spans):
    """Old one-span OTLP records and new compact records on one spool all arrive, once."""
    old = old_spool_spans(15)
    new = make_spans(15)
    stats = shipper_for(receiver, spool).drain(10)
    assert stats.shipped_spans == 30
    assert sorted(o.id for o in receiver.observations) == sorted(old + new)
    assert {o.name for o in receiver.observations} >= {"old-0", "span-0"}
    assert receiver.duplicates() == {}


def test_dead_letters_of_both_record_forms_replay(receiver, spool, make_spans, old_spool_spans):
    """A rejected old record and a rejected new one are set aside as written, and
    `dead-letter replay` puts both back so they ship once the cause is fixed."""
    from click.testing import CliRunner

    from tracing._cli import main

    old = old_spool_spans(4)
    new = make_spans(4)
    receiver.set_poison(lambda span: span["name"] in ("old-1", "span-2"))
    stats = shipper_for(receiver, spool).drain(10)
    assert stats.dead_lettered == 2
    assert {letter.payloads[0][24] for letter in read_dead_letters(spool)} == {0x0A, 0x02}
    receiver.set_poison(None)
    env = {"LANGFUSE_PUBLIC_KEY": receiver.public_key, "LANGFUSE_SECRET_KEY": receiver.secret_key,
           "LANGFUSE_BASE_URL": receiver.base_url, "CELERY_LANGFUSE_SPOOL_DIR": str(spool)}
    replay = CliRunner().invoke(main, ["dead-letter", "replay"], env=env)
    assert "replayed 2" in replay.output, replay.output
    shipper_for(receiver, spool).drain(10)
    assert sorted({o.id for o in receiver.observations}) == sorted(old + new)
    assert receiver.duplicates() == {} and read_dead_letters(spool) == []


def test_an_undecodable_compact_record_is_set_aside_not_sent(receiver, spool, make_spans):
    """A compact record whose fields do not decode goes to dead-letter/; the rest ship."""
    ids = make_spans(3)
    [(segment, _)] = list_segments(spool)
    with segment.open("ab") as handle:
        handle.write(encode_frame(KIND_SPAN, bytes(range(24)) + b"\x02not marshal"))
    stats = shipper_for(receiver, spool).drain(10)
    assert sorted(o.id for o in receiver.observations) == sorted(ids)
    assert stats.dead_lettered == 1
    [letter] = read_dead_letters(spool)
    assert "undecodable" in letter.reason


def test_spans_dropped_before_the_spool_are_counted_by_cause(receiver, spool, make_spans, caplog):
    """A writer's KIND_DROPPED report is counted in the shipper's status by cause, with one
    log line for the cause, and the spans around it still ship."""
    import json as _json

    from tracing.shipping._status import read_status
    from tracing.spool import KIND_DROPPED, encode_frame

    make_spans(2)
    report = _json.dumps({"cause": "sdk_queue_full", "count": 7}).encode()
    SegmentWriter(spool).append(encode_frame(KIND_DROPPED, report) * 2)
    shipper = shipper_for(receiver, spool, handoff_url="off")
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        shipper.drain(10)
    assert shipper.stats.dropped_in_writers == {"sdk_queue_full": 14}
    assert (read_status(spool) or {}).get("dropped_in_writers") == {"sdk_queue_full": 14}
    assert len([r for r in caplog.records if "(sdk_queue_full)" in r.getMessage()]) == 1
    assert "14 span(s) of spool" in caplog.text  # the running total of spans lost
    assert len({o.id for o in receiver.observations}) == 2


def test_a_stop_that_leaves_records_says_how_many_and_where(receiver, spool, make_spans, caplog):
    """A warm stop that cannot deliver logs how many spans, scores and open attempts stay
    on disk, and the directory."""
    receiver.down()
    make_spans(3)
    shipper = shipper_for(receiver, spool, handoff_url="off", shutdown_timeout=0.2)
    shipper.start()
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        shipper.stop(0.2)
    [line] = [r.getMessage() for r in caplog.records if "stopping with" in r.getMessage()]
    assert "3 span(s), 0 score(s) and 0 open task attempt(s)" in line and str(spool) in line


def test_a_timed_out_batch_is_resent_alone_before_anything_new(receiver, spool, make_spans):
    """Langfuse slower than LANGFUSE_TIMEOUT (it stores what it got after the client gave
    up): the timed-out batch goes again alone, waited for longer, before the spans written
    since; each span arrives at most twice, and the status counts the resent ones."""
    receiver.set_latency(1.0)
    first = make_spans(10)
    shipper = shipper_for(receiver, spool, handoff_url="off", http_timeout=0.4)
    assert not shipper.cycle()  # timed out after 0.4 s: an unknown outcome
    later = make_spans(10)
    shipper.drain(15)
    receiver.wait_for_count(20, timeout=10)
    posts = [r for r in receiver.trace_requests if r.span_count]
    sent = [sorted(r.span_ids) for r in posts]
    assert sent[:2] == [sorted(first)] * 2, "the unknown batch alone, twice"
    assert sorted(i for ids in sent[2:] for i in ids) == sorted(later)
    copies = receiver.observations_by_id()
    assert max(len(c) for c in copies.values()) == 2 and len(copies) == 20
    assert shipper.stats.resent_spans == 10


def test_the_index_scan_feeds_the_batch_reader_once_per_record(tmp_path: Path):
    """The attempt index's scans (offered to the batch reader) are taken from where the reader
    stopped: every record becomes exactly one batch item, none is skipped or repeated."""
    from tracing.shipping._reader import SpoolReader
    from tracing.shipping._status import ShipperStats

    writer = SegmentWriter(tmp_path)
    frames = [encode_frame(KIND_SPAN, span_payload(bytes([i]) * 8, bytes(16), b"\x0a\x00"))
              for i in range(1, 4)]
    for frame in frames:
        writer.append(frame)
    [(path, segment)] = list_segments(tmp_path)
    reader = SpoolReader(tmp_path, ShipperStats())
    whole = scan_file(path, 0)
    two = len(frames[0]) + len(frames[1])
    assert reader.offer(path, segment, 0, scan_file(path, 0, two))
    assert not reader.offer(path, segment, two + 1, whole)  # starts past the reader
    assert not reader.offer(path, segment, 0, scan_file(path, 0, len(frames[0]) + 5))
    assert reader.offer(path, segment, 0, whole)  # overlaps: only the third record is new
    items, full = reader.next_batch()
    assert [item.payload[:1] for item in items if item.payload] == [b"\x01", b"\x02", b"\x03"]
    assert [item.end for item in items] == [r.end for r in whole.records] and not full
    writer.close()

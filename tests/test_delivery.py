"""The delivery rules, unit by unit: pure verdicts and backoff, the sender with a scripted
transport and a fake clock, the HTTP transport over ``httpx.MockTransport``. No sockets, no
sleeps: every test runs in milliseconds."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tracing import load_config
from tracing._config import Config
from tracing.shipping._delivery import (
    Backoff,
    SendResult,
    Verdict,
    after_failure,
    after_pause,
    backoff_delay,
    parse_retry_after,
    request_timeout,
    still_slow,
    verdict,
)
from tracing.shipping._reader import Item, SpoolReader
from tracing.shipping._sending import BatchSender
from tracing.shipping._status import ShipperStats
from tracing.shipping._transport import HttpTransport
from tracing.spool import read_cursor, read_dead_letters


def lowest(a: float, b: float) -> float:
    """A random source that always draws the low end."""
    return a


def highest(a: float, b: float) -> float:
    """A random source that always draws the high end."""
    return b


# --------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(("status", "spans", "expected"), [
    (200, 5, Verdict.DONE), (202, 1, Verdict.DONE), (204, 1, Verdict.DONE),
    (400, 5, Verdict.SPLIT), (413, 2, Verdict.SPLIT), (422, 9, Verdict.SPLIT),
    (400, 1, Verdict.REJECT), (413, 1, Verdict.REJECT),
    (401, 5, Verdict.PAUSE), (403, 1, Verdict.PAUSE),
    (429, 5, Verdict.BACK_OFF), (500, 5, Verdict.BACK_OFF), (502, 1, Verdict.BACK_OFF),
    (503, 1, Verdict.BACK_OFF), (504, 1, Verdict.BACK_OFF), (404, 1, Verdict.BACK_OFF),
    (301, 1, Verdict.BACK_OFF),
])
def test_verdict_by_status(status, spans, expected):
    """Each status code maps to the rule in the design (2xx done, 4xx reject/split, ...)."""
    assert verdict(SendResult(status), spans) is expected


def test_network_errors_back_off_and_unknown_outcome_is_its_own_verdict():
    """A refused connection backs off; a timeout after the request left is an unknown outcome."""
    assert verdict(SendResult(None, error="ConnectError: refused"), 3) is Verdict.BACK_OFF
    assert verdict(SendResult(None, error="ReadTimeout", maybe_sent=True), 3) is Verdict.UNKNOWN


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    """0.5 s doubling per failure, half to all of it (jitter), never above 60 s."""
    assert [backoff_delay(n, None, highest) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(3, None, lowest) == 1.0
    assert backoff_delay(50, None, highest) == 60.0


def test_retry_after_wins_over_the_exponential_delay():
    """With Retry-After the wait is that long plus at most 0.25 s, never less."""
    assert backoff_delay(1, 7.0, lowest) == 7.0
    assert backoff_delay(9, 7.0, highest) == 7.25


def test_retry_after_parsing():
    """Retry-After in seconds or as an HTTP date; garbage and past dates are harmless."""
    now = 1_700_000_000.0
    assert parse_retry_after("12", now) == 12.0
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after(None, now) is None and parse_retry_after("soon", now) is None
    date = "Tue, 14 Nov 2023 22:13:50 GMT"  # now + 30 s
    assert parse_retry_after(date, now) == pytest.approx(30.0)
    assert parse_retry_after(date, now + 100) == 0.0


def test_backoff_state_after_failure_and_pause():
    """Failures count up from the monotonic now; a pause waits the auth interval."""
    state = after_failure(Backoff(), SendResult(503), now=100.0, uniform=highest)
    assert state == Backoff(1, 100.5) and not state.ready(100.4) and state.ready(100.5)
    state = after_failure(state, SendResult(429, retry_after=3.0), now=101.0, uniform=lowest)
    assert state == Backoff(2, 104.0)
    assert after_pause(state, now=200.0, interval=30.0) == Backoff(2, 230.0)


# --------------------------------------------------------------------------- the sender


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A transport answering each body with ``answer(spans_in_body)``; records what it got."""

    def __init__(self, answer: Callable[[list[bytes]], SendResult]) -> None:
        self.answer = answer
        self.sent: list[list[bytes]] = []

    def send(self, body: bytes, timeout: float) -> SendResult:
        spans = body.split(b"|")[1:]
        self.sent.append(spans)
        return self.answer(spans)

    def close(self) -> None:
        pass


def config_for(spool: Path, **extra: object) -> Config:
    return load_config(environ={}, public_key="pk-lf-unit", secret_key="sk-lf-unit",
                       base_url="http://langfuse.invalid", spool_dir=str(spool), **extra)


def items_in(spool: Path, n: int) -> list[Item]:
    """``n`` span items of one segment; each payload's body is ``|span-<i>``."""
    segment = spool / "seg-1-1-000000.spool"
    return [Item(segment, (i + 1) * 100, bytes(24) + f"|span-{i}".encode()) for i in range(n)]


def sender_for(tmp_path: Path, answer: Callable[[list[bytes]], SendResult],
               **extra: object) -> tuple[BatchSender, Scripted, FakeClock, ShipperStats]:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    stats = ShipperStats()
    transport, clock = Scripted(answer), FakeClock()
    sender = BatchSender(config_for(spool, **extra), transport, SpoolReader(spool, stats),
                         stats, clock=clock, uniform=highest)
    return sender, transport, clock, stats


def test_2xx_commits_the_batch(tmp_path):
    """A 2xx moves the cursor past every record of the batch, in one request."""
    sender, transport, _, stats = sender_for(tmp_path, lambda spans: SendResult(200))
    items = items_in(tmp_path / "spool", 5)
    assert sender.deliver(items)
    assert len(transport.sent) == 1 and stats.shipped_spans == 5
    assert read_cursor(items[0].path) == 500


def test_400_splits_down_to_the_poison_record(tmp_path):
    """One bad span among 100: halving isolates it, 99 delivered, one dead-lettered."""
    def answer(spans: list[bytes]) -> SendResult:
        return SendResult(400, body="bad span") if b"span-42" in spans else SendResult(200)

    sender, transport, _, stats = sender_for(tmp_path, answer)
    items = items_in(tmp_path / "spool", 100)
    assert sender.deliver(items)
    assert stats.shipped_spans == 99 and stats.dead_lettered == 1
    assert len(transport.sent) <= 2 * 7 + 1
    [letter] = read_dead_letters(tmp_path / "spool")
    assert letter.payloads == [items[42].payload] and "HTTP 400" in letter.reason
    delivered = [s for spans in transport.sent if answer(spans).status == 200 for s in spans]
    assert len(delivered) == len(set(delivered)) == 99  # nothing sent twice after a 2xx
    assert read_cursor(items[0].path) == 10_000


def test_413_splits_until_each_part_fits(tmp_path):
    """A batch over the size limit is halved until every part is accepted."""
    sender, transport, _, stats = sender_for(
        tmp_path, lambda spans: SendResult(413) if len(spans) > 3 else SendResult(200))
    assert sender.deliver(items_in(tmp_path / "spool", 16))
    accepted = [s for spans in transport.sent if len(spans) <= 3 for s in spans]
    assert stats.shipped_spans == 16 and stats.dead_lettered == 0
    assert len(accepted) == len(set(accepted)) == 16


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_pauses_keeps_records_and_names_the_key(tmp_path, caplog, status):
    """401/403: nothing committed, one log line naming the key, retried after the interval."""
    sender, _, clock, stats = sender_for(tmp_path, lambda spans: SendResult(status),
                                         auth_retry_interval=30)
    items = items_in(tmp_path / "spool", 3)
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        assert not sender.deliver(items)
        assert not sender.deliver(items)  # the same answer again: no second log line
    assert read_cursor(items[0].path) == 0 and stats.paused
    assert caplog.text.count("pk-lf-unit") == 1
    assert not sender.ready()
    clock.now += 30
    assert sender.ready()


def test_429_waits_for_retry_after(tmp_path):
    """429 with Retry-After: nothing is sent before it passes, then the batch goes."""
    answers = [SendResult(429, retry_after=7.0), SendResult(200)]
    sender, transport, clock, stats = sender_for(tmp_path, lambda spans: answers.pop(0))
    items = items_in(tmp_path / "spool", 2)
    assert not sender.deliver(items)
    clock.now += 7.0
    assert not sender.ready()  # jitter is added on top, never taken off
    clock.now += 0.25
    assert sender.ready() and sender.deliver(items)
    assert stats.shipped_spans == 2 and len(transport.sent) == 2


@pytest.mark.parametrize("result", [
    SendResult(500), SendResult(503), SendResult(None, error="ConnectError: refused"),
])
def test_5xx_and_network_errors_back_off_exponentially_and_drop_nothing(tmp_path, result):
    """Retryable failures back off 0.5, 1, 2, 4 s ... and keep every record."""
    sender, _, clock, stats = sender_for(tmp_path, lambda spans: result)
    items = items_in(tmp_path / "spool", 4)
    waits = []
    for _ in range(4):
        assert not sender.deliver(items)
        waits.append(sender.backoff.not_before - clock.now)
        clock.now = sender.backoff.not_before
    assert waits == [0.5, 1.0, 2.0, 4.0]
    assert read_cursor(items[0].path) == 0 and stats.shipped_spans == 0


def test_unknown_outcome_is_resent_and_backoff_resets_on_success(tmp_path, caplog):
    """A read timeout keeps the records (resent later: the one allowed duplicate); a 2xx
    after it commits them, resets the backoff and logs that shipping resumed."""
    answers = [SendResult(None, error="ReadTimeout: timed out", maybe_sent=True),
               SendResult(200)]
    sender, transport, clock, stats = sender_for(tmp_path, lambda spans: answers.pop(0))
    items = items_in(tmp_path / "spool", 3)
    with caplog.at_level(logging.INFO, logger="celery_langfuse"):
        assert not sender.deliver(items)
        clock.now = sender.backoff.not_before
        assert sender.deliver(items)
    assert transport.sent[0] == transport.sent[1]
    assert sender.backoff == Backoff() and stats.last_error is None
    assert "shipping resumed" in caplog.text


def test_deadline_bounds_the_request_timeout(tmp_path):
    """Near a stop deadline the request timeout shrinks to what is left (at least 0.2 s)."""
    timeouts = []

    class Recording(Scripted):
        def send(self, body: bytes, timeout: float) -> SendResult:
            timeouts.append(timeout)
            return SendResult(200)

    sender, _, clock, _ = sender_for(tmp_path, lambda spans: SendResult(200))
    sender.transport = Recording(lambda spans: SendResult(200))
    sender.deliver(items_in(tmp_path / "spool", 1), deadline=clock.now + 1.5)
    sender.deliver(items_in(tmp_path / "spool", 1), deadline=clock.now - 5)
    sender.deliver(items_in(tmp_path / "spool", 1))
    assert timeouts == [1.5, 0.2, sender.config.http_timeout]


# --------------------------------------------------------------------------- HTTP transport


def mock_transport(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]
                   ) -> HttpTransport:
    return HttpTransport(config_for(tmp_path / "spool"), transport=httpx.MockTransport(handler))


def test_http_transport_posts_gzip_protobuf_with_the_sdk_headers(tmp_path):
    """One POST to the OTLP endpoint: gzip body, Basic auth, the SDK's Langfuse headers."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    result = mock_transport(tmp_path, handler).send(b"otlp-bytes", timeout=3)
    assert result == SendResult(200, body='{"ok":true}')
    [request] = seen
    assert str(request.url) == "http://langfuse.invalid/api/public/otel/v1/traces"
    assert gzip.decompress(request.content) == b"otlp-bytes"
    headers = request.headers
    assert headers["authorization"].startswith("Basic ")
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["content-encoding"] == "gzip"
    assert headers["x-langfuse-ingestion-version"] == "4"
    assert headers["x-langfuse-public-key"] == "pk-lf-unit"
    assert headers["x-langfuse-sdk-name"] == "python" and headers["x-langfuse-sdk-version"]


def test_http_transport_reads_retry_after(tmp_path):
    """A 429's Retry-After header reaches the verdict as seconds."""
    transport = mock_transport(
        tmp_path, lambda request: httpx.Response(429, headers={"Retry-After": "7"}))
    assert transport.send(b"x", 1).retry_after == 7.0


@pytest.mark.parametrize(("exc", "maybe_sent"), [
    (httpx.ConnectError("refused"), False), (httpx.ConnectTimeout("slow"), False),
    (httpx.ReadTimeout("timed out"), True), (httpx.RemoteProtocolError("reset"), True),
])
def test_http_transport_tells_whether_the_request_may_have_left(tmp_path, exc, maybe_sent):
    """Errors before connecting mean not sent; errors after sending mean an unknown outcome."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    result = mock_transport(tmp_path, handler).send(b"x", 1)
    assert result.status is None and result.maybe_sent is maybe_sent
    assert type(exc).__name__ in (result.error or "")


# --------------------------------------------------------------------------- a slow Langfuse


def test_request_timeout_is_longer_in_a_slow_episode_and_bounded():
    """The base timeout normally; four times it in a slow episode (at most 120 s, never
    below the base); a stop deadline and the 0.2 s floor bound both."""
    assert request_timeout(2.0, False) == 2.0
    assert request_timeout(2.0, True) == 8.0
    assert request_timeout(60.0, True) == 120.0
    assert request_timeout(200.0, True) == 200.0
    assert request_timeout(2.0, True, left=3.0) == 3.0
    assert request_timeout(2.0, True, left=-1.0) == 0.2


def test_slow_episode_starts_with_a_timeout_and_ends_with_a_prompt_answer():
    """An unknown outcome starts (or continues) it; an answer within the base timeout ends
    it; a later answer keeps it."""
    assert still_slow(False, Verdict.UNKNOWN, 2.0, 2.0)
    assert still_slow(True, Verdict.UNKNOWN, 8.0, 2.0)
    assert still_slow(True, Verdict.DONE, 5.0, 2.0)
    assert not still_slow(True, Verdict.DONE, 0.3, 2.0)
    assert not still_slow(True, Verdict.BACK_OFF, 0.01, 2.0)
    assert not still_slow(False, Verdict.DONE, 5.0, 2.0)


class SlowLangfuse:
    """Answers after ``latency`` seconds of the fake clock, and stores every request it got
    even when the client gave up first (as Langfuse does): a timeout is an unknown outcome."""

    def __init__(self, clock: FakeClock, latency: float) -> None:
        self.clock = clock
        self.latency = latency
        self.stored: list[bytes] = []
        self.timeouts: list[float] = []

    def send(self, body: bytes, timeout: float) -> SendResult:
        self.timeouts.append(timeout)
        self.stored.extend(body.split(b"|")[1:])
        if timeout < self.latency:
            self.clock.now += timeout
            return SendResult(None, error="ReadTimeout: timed out", maybe_sent=True)
        self.clock.now += self.latency
        return SendResult(200)

    def close(self) -> None:
        pass


def test_a_slow_langfuse_costs_at_most_one_extra_copy_per_span(tmp_path):
    """Langfuse answering after 5 s with LANGFUSE_TIMEOUT=2: the timed-out batch is offered
    alone again (``unknown_batch``) and waited for 8 s, later batches too while Langfuse stays
    slow; each span reaches it at most twice, the resent ones are counted, and a prompt
    answer ends the episode."""
    sender, _, clock, stats = sender_for(tmp_path, lambda spans: SendResult(200),
                                         http_timeout=2)
    slow = SlowLangfuse(clock, latency=5.0)
    sender.transport = slow
    first, second = items_in(tmp_path / "spool", 6)[:3], items_in(tmp_path / "spool", 6)[3:]
    assert not sender.deliver(first)  # timed out after 2 s: stored, but we cannot know
    assert sender.slow and sender.unknown_batch(sender.reader.cursor) == first
    clock.now = sender.backoff.not_before
    assert sender.deliver(sender.unknown_batch(sender.reader.cursor))
    assert sender.unknown_batch(sender.reader.cursor) == []
    assert sender.deliver(second)  # still slow: waited for, not timed out
    assert slow.timeouts == [2.0, 8.0, 8.0]
    copies = {span: slow.stored.count(span) for span in slow.stored}
    assert max(copies.values()) == 2 and sum(copies.values()) == 6 + 3
    assert stats.resent_spans == 3 and stats.shipped_spans == 6
    slow.latency = 0.1
    assert sender.deliver(items_in(tmp_path / "spool", 7)[6:])
    assert not sender.slow and sender.deliver(items_in(tmp_path / "spool", 8)[7:])
    assert slow.timeouts[-1] == 2.0  # the episode is over: the configured timeout again

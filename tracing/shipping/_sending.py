"""Sending one batch and acting on the verdict (``_delivery``): commit, split, dead-letter,
pause or back off, with the log lines an operator needs and nothing more.

Score records (``KIND_SCORE``) in a batch go to ``_score_sending.ScoreSender`` (another route,
its own backoff); spans go on as before. Scores live in segments of their own, so each
kind's cursor moves on its own answers (``_deliver_with_scores``)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from tracing._config import Config
from tracing.shipping._delivery import (
    Backoff,
    SendResult,
    Verdict,
    after_pause,
    request_timeout,
    split,
    still_slow,
    verdict,
)
from tracing.shipping._reader import Item, SpoolReader
from tracing.shipping._score_sending import ScoreSender, back_off, is_score
from tracing.shipping._status import ShipperStats
from tracing.shipping._transport import Transport
from tracing.spool import write_dead_letter
from tracing.spool._spanrecord import otlp_batch, otlp_span

logger = logging.getLogger("celery_langfuse")

class BatchSender:
    """Sends batches of span records and applies the delivery rules to each answer."""

    def __init__(
        self, config: Config, transport: Transport, reader: SpoolReader, stats: ShipperStats,
        *, clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
        score_transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.reader = reader
        self.stats = stats
        self.clock = clock
        self.uniform = uniform
        self.backoff = Backoff()
        self.slow = False  # in a slow episode (``_delivery``): longer waits, unknown first
        self.unknown: list[Item] = []  # the last batch whose outcome is unknown
        self._unsure: set[bytes] = set()  # ids of spans sent with an unknown outcome
        self._reported: set[str] = set()
        self.scores = ScoreSender(config, reader, stats, transport=score_transport, clock=clock,
                                  uniform=uniform)

    def ready(self) -> bool:
        return self.backoff.ready(self.clock())

    def unknown_batch(self, cursor: Callable[[Path], int]) -> list[Item]:
        """The batch whose outcome is unknown, minus what became done since (``cursor``: a
        segment's committed offset): to be resent alone, before anything new."""
        self.unknown = [item for item in self.unknown if item.end > cursor(item.path)]
        return list(self.unknown)

    def deliver(self, items: list[Item], deadline: float | None = None) -> bool:
        """Send ``items``; True if all became done, False if shipping must wait."""
        if any(is_score(item) for item in items):
            return self._deliver_with_scores(items, deadline)
        spans, body = self._encode(items)
        if not spans:
            self.reader.commit(items)
            return True
        ids = [item.payload[:8] for item in spans if item.payload is not None]
        self.stats.resent_spans += sum(1 for span_id in ids if span_id in self._unsure)
        started = self.clock()
        result = self.transport.send(body, self._timeout(deadline))
        self.stats.requests += 1
        self.stats.last_status = result.status
        rule = verdict(result, len(spans))
        self._note_speed(rule, self.clock() - started, len(spans))
        if rule is Verdict.UNKNOWN:
            self.unknown = list(items)
            if len(self._unsure) > 100_000:  # bounded; only the resent count would suffer
                self._unsure.clear()
            self._unsure.update(ids)
        elif rule in (Verdict.DONE, Verdict.REJECT):
            self._unsure.difference_update(ids)  # stored, or set aside: never resent
        if rule is Verdict.DONE:
            self._delivered(items, len(spans))
            return True
        if rule is Verdict.SPLIT:
            # Langfuse rejects a whole batch for one bad span: halve until it stands alone.
            middle = items.index(spans[split(len(spans))])
            return self.deliver(items[:middle], deadline) and self.deliver(
                items[middle:], deadline)
        if rule is Verdict.REJECT:
            self._dead_letter(items, spans[0], result)
            return True
        if rule is Verdict.PAUSE:
            self._pause(result)
            return False
        self._back_off(result)
        return False

    def _deliver_with_scores(self, items: list[Item], deadline: float | None) -> bool:
        """Spans of score-free paths first, then each path holding scores in runs of one kind.

        A spool segment holds one kind, so a run is the whole path; a hand-off batch (one
        path, entries acknowledged one by one) may alternate kinds: runs keep their order.
        """
        score_paths = {item.path for item in items if is_score(item)}
        others = [item for item in items if item.path not in score_paths]
        ok = self.deliver(others, deadline) if others else True
        runs: list[tuple[bool, list[Item]]] = []
        for item in (item for item in items if item.path in score_paths):
            kind = is_score(item) if item.payload is not None else None
            if runs and (kind is None or kind == runs[-1][0]):
                runs[-1][1].append(item)
            else:
                runs.append((bool(kind), [item]))
        for scores, run in runs:
            if scores:
                done = self.scores.deliver(run, deadline)
            else:
                done = ok and self.deliver(run, deadline)
            if not done:
                return False
        return ok

    def _encode(self, items: list[Item]) -> tuple[list[Item], bytes]:
        """The span items and their OTLP request (each resource and scope encoded once); an
        undecodable record is set aside."""
        spans, parts = [], []
        for item in items:
            if item.payload is None:
                continue
            try:
                parts.append(otlp_span(item.payload))
            except ValueError as exc:
                self._set_aside(item.payload, f"{exc} (in {item.path.name})")
                item.payload = None  # done with the batch, never sent
                continue
            spans.append(item)
        return spans, otlp_batch(parts)

    def _timeout(self, deadline: float | None) -> float:
        left = None if deadline is None else deadline - self.clock()
        return request_timeout(self.config.http_timeout, self.slow, left)

    def _note_speed(self, rule: Verdict, elapsed: float, spans: int) -> None:
        """Enter or leave a slow episode (``_delivery.still_slow``), with one line each."""
        base = self.config.http_timeout
        slow = still_slow(self.slow, rule, elapsed, base)
        if slow and not self.slow:
            logger.warning(
                "celery-langfuse: Langfuse did not answer within %gs (LANGFUSE_TIMEOUT); it "
                "may have stored the %d span(s) of that request. Resending them alone and "
                "waiting up to %gs per request until it answers within %gs again.",
                base, spans, request_timeout(base, True), base)
        elif self.slow and not slow:
            logger.info("celery-langfuse: Langfuse answers within LANGFUSE_TIMEOUT again")
        self.slow = slow

    def _delivered(self, items: list[Item], span_count: int) -> None:
        self.reader.commit(items)
        self.stats.shipped_spans += span_count
        self.stats.last_success_at = time.time()
        self.stats.last_error = None
        if self.backoff.failures or self.stats.paused:
            logger.info("celery-langfuse: shipping resumed; Langfuse accepted %d span(s)",
                        span_count)
        self.backoff = Backoff()
        self._reported.clear()
        self.stats.paused = None

    def _dead_letter(self, items: list[Item], span: Item, result: SendResult) -> None:
        reason = f"HTTP {result.status} from {self.config.base_url}: {result.body}"
        self._set_aside(span.payload or b"", f"Langfuse rejected it: {reason}")
        self.reader.commit(items)

    def _set_aside(self, payload: bytes, reason: str) -> None:
        """The record as written (either body form) goes to dead-letter/, with the reason."""
        write_dead_letter(self.reader.spool_dir, [payload], reason)
        self.stats.dead_lettered += 1
        logger.error(
            "celery-langfuse: span %s set aside in %s/dead-letter: %s (inspect or replay with "
            "`python -m tracing dead-letter`)", payload[:8].hex(), self.reader.spool_dir, reason,
        )

    def _pause(self, result: SendResult) -> None:
        interval = self.config.auth_retry_interval
        message = (
            f"Langfuse answered HTTP {result.status} for public key {self.config.public_key!r} "
            f"at {self.config.base_url}: shipping is paused and records are kept in "
            f"{self.reader.spool_dir}. Check LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY; "
            f"retrying every {interval:g}s and at the next start."
        )
        if self.stats.paused != message:
            logger.error("celery-langfuse: %s", message)
        self.stats.paused = message
        self.stats.last_error = f"HTTP {result.status}"
        self.backoff = after_pause(self.backoff, self.clock(), interval)

    def _back_off(self, result: SendResult) -> None:
        back_off(self, result, "spans")

"""Shipping score records: ``POST /api/public/ingestion`` and the per-event 207 verdicts.

The shipper's ``BatchSender`` hands score items (``_spool.KIND_SCORE``) here. A batch is
``{"batch": [event, ...]}``, the events exactly as recorded, uncompressed JSON with the
SDK's Basic auth (Next.js's body parser on Langfuse's route takes JSON; its limit is 4.5 MB, so
a request carries at most ``max_request_bytes``, 3 MB by default). The rules (``_delivery``):

* the whole request: 2xx other than 207 done; 400/413/422 split until alone, then the event is
  set aside; 401/403 pause; 429/5xx/network back off (this sender's own ``Backoff``, so a
  scores outage never holds spans back, nor the reverse).
* a 207: each event by its own status (``event_verdict``): done, rejected alone into
  ``dead-letter/`` with the reason, or kept (pause / back off); an event the answer does not
  mention is kept and resent (an upsert).

Commit: a spool cursor moves only over a segment's done *prefix* (``commit_done_prefix``); an
event done beyond a kept one is marked done in memory (payload ``None``), so it is not sent
again by this process and the cursor passes it with the next success. After a crash in that
window the score is resent, which Langfuse stores as the same score (same id).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from tracing._config import Config
from tracing.shipping._delivery import (
    Backoff,
    SendResult,
    Verdict,
    after_failure,
    after_pause,
    cut,
    describe,
    event_results,
    event_verdict,
    failure_kind,
    split,
    verdict,
)
from tracing.shipping._transport import HttpTransport, Transport, headers_for
from tracing.spool import KIND_SCORE, write_dead_letter
from tracing.spool._score_record import event_id_of

__all__ = ["INGESTION_PATH", "ScoreSender", "commit_done_prefix", "ingestion_transport",
           "is_score"]

logger = logging.getLogger("celery_langfuse")

INGESTION_PATH = "/api/public/ingestion"
MAX_EVENTS_PER_REQUEST = 500


class _Reader(Protocol):
    spool_dir: Any

    def commit(self, items: Any) -> None: ...


def is_score(item: Any) -> bool:
    """True for an item carrying a score record still to send."""
    return item.payload is not None and getattr(item, "kind", None) == KIND_SCORE


def ingestion_transport(config: Config, *, transport: Any = None) -> HttpTransport:
    """The transport for ``{base_url}/api/public/ingestion``: JSON, Basic auth, whole 207s."""
    headers = headers_for(config)
    headers.pop("Content-Encoding", None)
    headers.pop("x-langfuse-ingestion-version", None)  # the OTLP route's header, not this one's
    headers["Content-Type"] = "application/json"
    return HttpTransport(config, transport=transport, endpoint=config.base_url + INGESTION_PATH,
                         headers=headers, compress=False, max_body=4 * 1024 * 1024)


def commit_done_prefix(reader: _Reader, items: Iterable[Any]) -> bool:
    """Commit each path's leading done items (payload None); True if every item was done."""
    done: list[Any] = []
    blocked: set[Any] = set()
    for item in items:
        if item.path in blocked:
            continue
        if item.payload is None:
            done.append(item)
        else:
            blocked.add(item.path)
    reader.commit(done)
    return not blocked


class _Backing(Protocol):
    config: Config
    stats: Any
    backoff: Backoff
    clock: Callable[[], float]
    uniform: Callable[[float, float], float]
    _reported: set[str]


def back_off(sender: _Backing, result: SendResult, what: str) -> None:
    """A retryable failure: the next send waits (backoff, Retry-After); one log line per kind
    of failure, naming what is kept (``spans`` / ``scores``)."""
    sender.backoff = after_failure(sender.backoff, result, sender.clock(), sender.uniform)
    described = describe(result)
    sender.stats.last_error = described
    kind = failure_kind(result)
    if kind not in sender._reported:
        sender._reported.add(kind)
        hint = " (check LANGFUSE_BASE_URL)" if result.status in (404, 405) else ""
        logger.warning(
            "celery-langfuse: Langfuse at %s not accepting %s (%s)%s; backing off, nothing is "
            "dropped", sender.config.base_url, what, described, hint)


class ScoreSender:
    """Sends score items and applies the per-request and per-event rules."""

    def __init__(
        self, config: Config, reader: _Reader, stats: Any, *, transport: Transport | None = None,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
        max_request_bytes: int = 3 * 1024 * 1024,
    ) -> None:
        self.config = config
        self.reader = reader
        self.stats = stats
        self._transport = transport
        self.clock = clock
        self.uniform = uniform
        self.max_request_bytes = max_request_bytes
        self.backoff = Backoff()
        self.shipped = 0
        self._reported: set[str] = set()

    @property
    def transport(self) -> Transport:
        if self._transport is None:  # built on first use: most shippers never see a score
            self._transport = ingestion_transport(self.config)
        return self._transport

    def ready(self) -> bool:
        return self.backoff.ready(self.clock())

    def deliver(self, items: list[Any], deadline: float | None = None) -> bool:
        """Send the score items among ``items``; commit what is done; True if all of it is."""
        if not self.ready():
            return False
        events: list[tuple[Any, str]] = []
        for item in items:
            if not is_score(item):
                continue
            try:
                events.append((item, event_id_of(item.payload)))
            except ValueError as exc:
                self._set_aside(item, f"{exc} (in {item.path.name})")
        for chunk in self._chunks(events):
            if not self._send(chunk, deadline):
                break
        return commit_done_prefix(self.reader, items)

    def _chunks(self, events: list[tuple[Any, str]]) -> Iterable[list[tuple[Any, str]]]:
        chunk: list[tuple[Any, str]] = []
        size = 0
        for event in events:
            length = len(event[0].payload) + 1
            if chunk and (size + length > self.max_request_bytes
                          or len(chunk) >= MAX_EVENTS_PER_REQUEST):
                yield chunk
                chunk, size = [], 0
            chunk.append(event)
            size += length
        if chunk:
            yield chunk

    def _send(self, chunk: list[tuple[Any, str]], deadline: float | None) -> bool:
        """One request; True if every event of ``chunk`` is now done (delivered or set aside)."""
        body = b'{"batch":[' + b",".join(item.payload for item, _ in chunk) + b"]}"
        result = self.transport.send(body, self._timeout(deadline))
        self.stats.requests += 1
        self.stats.last_status = result.status
        rule = verdict(result, len(chunk))
        if rule is Verdict.DONE:
            return self._judge_events(chunk, result)
        if rule is Verdict.SPLIT:
            middle = split(len(chunk))
            return self._send(chunk[:middle], deadline) and self._send(chunk[middle:], deadline)
        if rule is Verdict.REJECT:
            self._set_aside(chunk[0][0], self._reason(result.status, result.body))
            return True
        if rule is Verdict.PAUSE:
            self._pause(result.status)
            return False
        self._back_off(result)
        return False

    def _judge_events(self, chunk: list[tuple[Any, str]], result: SendResult) -> bool:
        if result.status != 207:
            self._delivered([item for item, _ in chunk])
            return True
        results = event_results(result.body)
        if results is None:
            self._back_off(SendResult(207, error=f"unreadable 207 answer: {cut(result.body, 200)}"))
            return False
        delivered, kept, paused = [], 0, None
        for item, event_id in chunk:
            status, reason = results.get(event_id, (0, ""))
            rule = event_verdict(status) if status else Verdict.BACK_OFF
            if rule is Verdict.DONE:
                delivered.append(item)
            elif rule is Verdict.REJECT:
                self._set_aside(item, self._reason(status, reason))
            else:
                kept += 1
                paused = status if rule is Verdict.PAUSE else paused
        self._delivered(delivered)
        if not kept:
            return True
        if paused is not None:
            self._pause(paused)
        else:
            self._back_off(SendResult(207, error=f"207: {kept} score event(s) not accepted yet"))
        return False

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.config.http_timeout
        return max(0.2, min(self.config.http_timeout, deadline - self.clock()))

    def _reason(self, status: int | None, text: str) -> str:
        return (f"Langfuse rejected it: HTTP {status} from {self.config.base_url}"
                f"{INGESTION_PATH}: {cut(text, 500)}")

    def _delivered(self, items: list[Any]) -> None:
        for item in items:
            item.payload = None  # done: never sent again by this process
        if not items:
            return
        self.shipped += len(items)
        self.stats.last_success_at = time.time()
        if self.backoff.failures or self._reported:
            logger.info("celery-langfuse: score shipping resumed; Langfuse accepted %d score(s)",
                        len(items))
        self.backoff = Backoff()
        self._reported.clear()

    def _set_aside(self, item: Any, reason: str) -> None:
        write_dead_letter(self.reader.spool_dir, [item.payload or b""], reason, kind=KIND_SCORE)
        item.payload = None
        self.stats.dead_lettered += 1
        logger.error("celery-langfuse: a score record was set aside in %s/dead-letter: %s",
                     self.reader.spool_dir, reason)

    def _pause(self, status: int | None) -> None:
        interval = self.config.auth_retry_interval
        key = f"pause {status}"
        if key not in self._reported:
            self._reported.add(key)
            logger.error(
                "celery-langfuse: Langfuse answered HTTP %s to scores for public key %r at %s; "
                "scores are kept in %s and retried every %gs. Check LANGFUSE_PUBLIC_KEY / "
                "LANGFUSE_SECRET_KEY.", status, self.config.public_key, self.config.base_url,
                self.reader.spool_dir, interval)
        self.stats.last_error = f"HTTP {status} (scores)"
        self.backoff = after_pause(self.backoff, self.clock(), interval)

    def _back_off(self, result: SendResult) -> None:
        back_off(self, result, "scores")

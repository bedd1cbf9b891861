"""The delivery rules, as pure functions over what one POST came to.

Nothing here does I/O, reads a clock or draws a random number: the caller passes ``now`` and
a random source, so every rule is unit-tested in microseconds (tests/test_delivery.py).
Langfuse answers JSON, not OTLP, so a send is judged by its status code alone:

============================  ===========  ==============================================
what came back                verdict      what the shipper does
============================  ===========  ==============================================
2xx                           DONE         cursor past the records; never sent again
400 / 413 / 422, > 1 span     SPLIT        send each half on its own
400 / 413 / 422, one span     REJECT       that record alone goes to ``dead-letter/``
401 / 403                     PAUSE        keep records; one log line naming the key;
                                           retry after ``auth_retry_interval``
429, 5xx, any other status,   BACK_OFF     keep records; exponential backoff with jitter,
connection never made                      never earlier than ``Retry-After``
timeout / reset after the     UNKNOWN      as BACK_OFF: the only case where a record may
request left                               reach Langfuse twice (its outcome is unknown)
============================  ===========  ==============================================

**A slow Langfuse** (answers later than ``LANGFUSE_TIMEOUT``) stores what it was sent even
though the shipper stopped waiting, so every resend is a copy. After an UNKNOWN verdict a
*slow episode* begins (``still_slow``): the batch whose outcome is unknown is resent alone,
before anything new (the shipper pins it), and every request waits ``SLOW_FACTOR`` times
longer (``request_timeout``), so the resend is answered and each span gets at most one extra
copy per episode. The episode ends with the first answer that comes within the configured
timeout again.

Scores go to ``/api/public/ingestion``, whose 2xx is a 207 with a result per event
(``event_results``); each event is judged on its own status (``event_verdict``): 2xx done,
401/403 PAUSE, 408/429/5xx BACK_OFF, any other 4xx REJECT (that event alone is set aside).
An event the answer does not mention is kept and resent: a score resent is an upsert.
"""

from __future__ import annotations

import email.utils
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass

REJECTED = frozenset({400, 413, 422})
AUTH = frozenset({401, 403})
BASE_DELAY = 0.5
MAX_DELAY = 60.0
RETRY_AFTER_JITTER = 0.25


@dataclass(frozen=True)
class SendResult:
    """What one POST came to: a status code, or an error before any status arrived.

    ``maybe_sent`` is True when the error happened after the request may have left (a read
    timeout, a reset connection): Langfuse may have stored the spans.
    """

    status: int | None
    retry_after: float | None = None
    error: str | None = None
    body: str = ""
    maybe_sent: bool = False


class Verdict(enum.Enum):
    DONE = "done"
    SPLIT = "split"
    REJECT = "reject"
    PAUSE = "pause"
    BACK_OFF = "back off"
    UNKNOWN = "unknown outcome"


def verdict(result: SendResult, spans: int) -> Verdict:
    """The rule for ``result`` of a request that carried ``spans`` span records."""
    status = result.status
    if status is None:
        return Verdict.UNKNOWN if result.maybe_sent else Verdict.BACK_OFF
    if 200 <= status < 300:
        return Verdict.DONE
    if status in REJECTED:
        return Verdict.SPLIT if spans > 1 else Verdict.REJECT
    if status in AUTH:
        return Verdict.PAUSE
    return Verdict.BACK_OFF


def backoff_delay(
    failures: int, retry_after: float | None, uniform: Callable[[float, float], float]
) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 for the first).

    Exponential from 0.5 s, capped at 60 s, with "equal jitter" (half to all of it), unless
    the server said ``Retry-After``: then exactly that plus up to 0.25 s, never earlier.
    """
    if retry_after is not None:
        return retry_after + uniform(0.0, RETRY_AFTER_JITTER)
    delay = min(MAX_DELAY, BASE_DELAY * 2 ** min(max(failures, 1) - 1, 10))
    return delay * uniform(0.5, 1.0)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    ``now`` is the wall clock (``time.time()``), needed only for the date form.
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class Backoff:
    """Consecutive failures and the monotonic time before which nothing is sent."""

    failures: int = 0
    not_before: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before


def after_failure(
    state: Backoff, result: SendResult, now: float, uniform: Callable[[float, float], float]
) -> Backoff:
    """The backoff after a BACK_OFF / UNKNOWN verdict, at monotonic time ``now``."""
    failures = state.failures + 1
    return Backoff(failures, now + backoff_delay(failures, result.retry_after, uniform))


def after_pause(state: Backoff, now: float, interval: float) -> Backoff:
    """The backoff after a PAUSE verdict (bad keys): retry once per ``interval``."""
    return Backoff(state.failures, now + interval)


SLOW_FACTOR = 4.0
SLOW_TIMEOUT_MAX = 120.0
MIN_TIMEOUT = 0.2


def request_timeout(base: float, slow: bool, left: float | None = None) -> float:
    """Seconds to wait for the next answer: ``base`` (``LANGFUSE_TIMEOUT``), or during a slow
    episode ``SLOW_FACTOR`` times that (at most ``SLOW_TIMEOUT_MAX``, never below ``base``);
    never past a stop deadline ``left`` seconds away, never below 0.2 s."""
    timeout = max(base, min(base * SLOW_FACTOR, SLOW_TIMEOUT_MAX)) if slow else base
    if left is not None:
        timeout = min(timeout, left)
    return max(MIN_TIMEOUT, timeout)


def still_slow(slow: bool, rule: Verdict, elapsed: float, base: float) -> bool:
    """Whether a slow episode goes on after an answer that took ``elapsed`` seconds: an
    unknown outcome (a timeout) starts or continues it; an answer within ``base`` ends it;
    a later answer (within the longer wait) keeps it."""
    if rule is Verdict.UNKNOWN:
        return True
    return slow and elapsed >= base


def split(count: int) -> int:
    """Where to cut a rejected batch of ``count`` span records: its middle."""
    return count // 2


def failure_kind(result: SendResult) -> str:
    """A short name for a failure, so each kind is logged once, not once per retry."""
    if result.error:
        return result.error.split(":")[0]
    return str(result.status)


def cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start ending in "…"."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def describe(result: SendResult) -> str:
    """A failure for humans: the error, or the status and the start of the body."""
    return result.error or f"HTTP {result.status}: {cut(result.body, 200)}"


def event_verdict(status: int) -> Verdict:
    """The rule for one event's own status in a 207 answer of ``/api/public/ingestion``."""
    if 200 <= status < 300:
        return Verdict.DONE
    if status in AUTH:
        return Verdict.PAUSE
    if status in (408, 429) or status >= 500 or status < 400:
        return Verdict.BACK_OFF
    return Verdict.REJECT


def event_results(body: str) -> dict[str, tuple[int, str]] | None:
    """Each event id's (status, reason) in a 207 body ``{"successes": [...], "errors": [...]}``.

    None if the body is not such an answer (the caller keeps every event and retries).
    """
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    results: dict[str, tuple[int, str]] = {}
    for key in ("successes", "errors"):
        entries = document.get(key, [])
        if not isinstance(entries, list):
            return None
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            try:
                status = int(entry.get("status") or (201 if key == "successes" else 500))
            except (TypeError, ValueError):
                status = 500
            reason = ": ".join(str(entry[k]) for k in ("message", "error") if entry.get(k))
            results[entry["id"]] = (status, reason)
    return results

"""Draining the hand-off stream: how every running shipper takes what stopping workers left.

The stream, its entry format and the drain order are specified in ``_handoff``'s docstring
(sections "Draining" and "What is at-least-once"); this module is the drainer and the wiring
that gives a worker's shipper one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from tracing.shipping._handoff import (
    KIND_UNREADABLE,
    HandoffItem,
    HandoffStore,
    HandoffUnavailable,
    deployment_key,
    mask_url,
    resolve_handoff_url,
)
from tracing.spool import write_dead_letter

__all__ = [
    "HandoffDrainer",
    "HandoffReader",
    "broker_url",
    "drainer_for",
    "with_broker",
]

logger = logging.getLogger("celery_langfuse")

class HandoffReader:
    """What a spool sender commits through, for hand-off entries: ``commit`` acknowledges.

    ``spool_dir`` is the local spool, whose ``dead-letter/`` receives what Langfuse refuses.
    """

    def __init__(self, store: HandoffStore, spool_dir: Path | str) -> None:
        self.store = store
        self.spool_dir = Path(spool_dir)

    def commit(self, items: Iterable[Any]) -> None:
        self.store.commit(items)


Deliver = Callable[[list[Any], "float | None"], bool]


class HandoffDrainer:
    """Drains the hand-off stream with a sender; a running shipper calls ``drain_once``.

    ``deliver(items, deadline)`` ships items under the delivery rules and calls
    ``HandoffReader.commit`` for those done (``_sending.BatchSender.deliver``); ``ready()``
    says whether its backoff allows a send now. An empty stream is looked at once per
    ``idle_interval``; an unreachable Redis once per ``retry_interval``, with one log line
    per outage.
    """

    def __init__(
        self, store: HandoffStore, deliver: Deliver, *, spool_dir: Path | str,
        ready: Callable[[], bool] = lambda: True, count: int = 200,
        idle_interval: float = 1.0, retry_interval: float = 10.0,
    ) -> None:
        self.store = store
        self.deliver = deliver
        self.spool_dir = Path(spool_dir)
        self.ready = ready
        self.count = count
        self.idle_interval = idle_interval
        self.retry_interval = retry_interval
        self.shipped = 0
        self.set_aside = 0
        self._next_look = 0.0
        self._outage: str | None = None

    def drain_once(self) -> int:
        """Take one batch and ship it; return how many records became done (0: nothing to do,
        Redis unreachable, backing off, or not delivered yet)."""
        now = time.monotonic()
        if now < self._next_look or not self.ready():
            return 0
        try:
            items = self.store.take(self.count)
        except HandoffUnavailable as exc:
            if self._outage is None:
                logger.warning("celery-langfuse: hand-off store unavailable (%s); retrying "
                               "every %gs", exc, self.retry_interval)
            self._outage = str(exc)
            self._next_look = now + self.retry_interval
            return 0
        if self._outage is not None:
            logger.info("celery-langfuse: hand-off store %s reachable again", self.store.key)
            self._outage = None
        if not items:
            self._next_look = now + self.idle_interval
            return 0
        done = self._set_aside_unreadable([i for i in items if i.payload is None])
        good = [i for i in items if i.payload is not None]
        if good and self.deliver(good, self.store.claim_deadline()):
            done += len(good)
            self.shipped += len(good)
        return done

    def _set_aside_unreadable(self, items: list[HandoffItem]) -> int:
        if not items:
            return 0
        write_dead_letter(self.spool_dir, [i.raw or b"" for i in items],
                          f"unreadable entries of hand-off stream {self.store.key}",
                          kind=KIND_UNREADABLE)
        self.store.commit(items)
        self.set_aside += len(items)
        return len(items)


def broker_url() -> str | None:
    """The current Celery app's broker URL (the worker's, in a worker), or None."""
    try:
        from celery import current_app

        url = current_app.conf.broker_url
    except Exception:  # no app configured, or a broken one: no default hand-off
        return None
    return str(url) if url else None


def with_broker(config: Any) -> Any:
    """``config`` with an "auto" hand-off URL resolved against this process's Celery broker
    (``broker_url``): what a shipper in a process of its own, with no Celery app, is given."""
    if getattr(config, "handoff_url", None) != "auto":
        return config
    return dataclasses.replace(config, handoff_url=resolve_handoff_url("auto", broker_url()))


def drainer_for(
    config: Any, spool_dir: Path | str, transport: Any, stats: Any,
    broker: str | None = None,
) -> HandoffDrainer | None:
    """The hand-off drainer a shipper runs, or None when hand-off is off (or has no Redis).

    ``config.handoff_url`` is a URL, None (off), or "auto" resolved against ``broker``. A
    worker's runtime resolves "auto" with the worker's broker (``with_broker``) before building
    its shipper; any other shipper left with "auto" (a producer's, ``python -m tracing drain``)
    gets no drainer: asking Celery for its current app there costs the caller time, and
    draining the deployment's stream is the workers' job. The drainer sends with its own
    ``_sending.BatchSender`` over the shipper's ``transport`` and counts into its ``stats``.
    """
    if config.handoff_url == "auto" and broker is None:
        return None
    url = resolve_handoff_url(config.handoff_url, broker)
    if url is None:
        return None
    from tracing.shipping._sending import (
        BatchSender,  # the shipper's rules; imported late (no cycle)
    )

    store = HandoffStore(url, deployment_key(config.base_url, config.public_key))
    sender = BatchSender(config, transport, cast(Any, HandoffReader(store, spool_dir)), stats)
    logger.info("celery-langfuse: hand-off store is Redis stream %s at %s", store.key,
                mask_url(url))
    return HandoffDrainer(store, sender.deliver, spool_dir=spool_dir, ready=sender.ready)

"""The hand-off store: records a stopping worker could not ship, kept in the deployment's Redis.

A worker container that stops for good (scale-down, deploy, spot reclaim with notice) makes a
last, bounded shipping attempt. Whatever it could not deliver in that time would otherwise stay
on a disk that is about to be deleted. Instead, the stopping shipper *hands it off*: it appends
the records to a Redis stream that every worker of the deployment can reach (by default the
Celery broker, when that is Redis), and every running shipper drains that stream under the same
delivery rules as its own spool. A local directory stays the primary spool; Redis holds only
what a stopping worker leaves behind.

Stream and group
----------------
::

    key       celery-langfuse:handoff:{deployment}            a Redis stream
    bytes     celery-langfuse:handoff:{deployment}:bytes      payload bytes in the stream
    group     shippers                                        one consumer group
    consumer  {hostname}:{pid}:{8 hex}                        one per shipper process

``deployment`` is the first 16 hex digits of ``sha256("{LANGFUSE_BASE_URL}\\n{public key}")``:
every worker sending to the same Langfuse project shares one stream, and a worker configured
for another project never ships (with its keys) records meant for this one. The group is
created at id ``0`` with ``MKSTREAM`` by whoever comes first, so entries added before it
existed are read too.

Entry format
------------
Each entry is one spool record (a span or a score), fields in this order::

    v   b"1"                       format version; a drainer sets aside what it cannot read
    k   the record kind, decimal   ``KIND_SPAN`` (1) or ``KIND_SCORE`` (5): see ``_spool``'s
                                   Record framing
    p   the record payload         unchanged: for KIND_SPAN the 8-byte span id, the 16-byte
                                   trace id and the body, OTLP or compact (``_spanrecord``);
                                   for KIND_SCORE the score-create event's JSON

The payload keeps its span and trace ids: a record handed off is the very record the spool held,
and Langfuse sees the same ids whichever worker ships it.

Handing off (``hand_off`` / ``handoff_remaining``)
---------------------------------------------------
The stopping shipper reads its spool batch by batch (the same reader that ships it), and for
each batch sends one ``MULTI`` … ``EXEC`` holding an ``XADD`` per record and one ``INCRBY`` of
the ``bytes`` counter, then commits the batch's spool cursor. All of a batch or none of it is
added; the cursor moves only after ``EXEC`` answered. Past ``max_bytes`` in the stream the
hand-off stops: the rest stays on disk, and one log line says how much and where. Redis
unreachable: the records stay on disk (the cursor did not move), one log line says so; the
worker still exits within its shutdown timeout.

Draining (``drain``)
---------------------
Every running shipper takes up to ``count`` entries per pass, in this order: its own pending
entries (``XREADGROUP … 0``, which also renews their delivery time), entries another consumer
has held for longer than ``lease`` (``XAUTOCLAIM``: a shipper that died or stopped with claims),
then new ones (``XREADGROUP … >``). It ships them with its sender: the same delivery rules as
the spool (2xx done; 400/413/422 split until the bad record is alone, which goes to the local
``dead-letter/``; 401/403 pause; 429/5xx/network back off; nothing dropped). An entry becomes
done only by ``XACK`` + ``XDEL`` + ``DECRBY`` in one ``MULTI``, after Langfuse's 2xx (or after
it was written to ``dead-letter/``). Not done: it stays in this consumer's pending list, and
the next pass takes it again.

What is at-least-once, and why there are no duplicates otherwise
----------------------------------------------------------------
A record is in exactly one place at a time, except in three windows where its outcome is
unknown, which is the only case in which the spool itself resends (see ``_shipper``):

* the hand-off's ``EXEC`` reply is lost, or the worker is killed between the reply and the
  cursor write: the records are in the stream and still on disk;
* a drainer is killed between Langfuse's 2xx and its ``XACK``: another shipper claims the
  entries after ``lease`` and sends them again;
* a drainer takes longer than ``lease`` between renewing its claim and its ``XACK``: another may
  claim and send them. A pass therefore gives its requests timeouts that end ``lease / 2``
  after it renewed its claims (``claim_deadline``; the sender's floor is 0.2 s a request, and
  splitting a batch of 200 around a poison span takes about 16 requests), and ``lease``
  defaults to 120 s, far above one request's timeout.

Everything else is exactly once: an entry is delivered to one consumer at a time (consumer
group), a claim is taken over only after ``lease`` of silence, and an entry is deleted only after
a 2xx.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from tracing.spool import KIND_SPAN

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_BYTES",
    "GROUP",
    "HandoffItem",
    "HandoffStore",
    "HandoffUnavailable",
    "RecordSource",
    "deployment_key",
    "handoff_remaining",
    "mask_url",
    "resolve_handoff_url",
]

logger = logging.getLogger("celery_langfuse")

KEY_PREFIX = "celery-langfuse:handoff:"
GROUP = "shippers"
FORMAT_VERSION = b"1"
DEFAULT_LEASE = 120.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
KIND_UNREADABLE = 0  # dead-letter kind of an unreadable entry (its fields, as repr bytes)


class HandoffUnavailable(RuntimeError):
    """Redis could not be reached or refused a command; the message says which and why."""


def deployment_key(base_url: str, public_key: str | None) -> str:
    """``celery-langfuse:handoff:{16 hex}``: one stream per Langfuse endpoint and project."""
    digest = hashlib.sha256(f"{base_url}\n{public_key or ''}".encode()).hexdigest()[:16]
    return KEY_PREFIX + digest


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for log lines."""
    return re.sub(r"(?<=//)([^/@]*)@", lambda m: ("***" if ":" not in m.group(1)
                  else m.group(1).split(":")[0] + ":***") + "@", url)


def resolve_handoff_url(setting: str | None, broker_url: str | None) -> str | None:
    """The Redis URL to hand off to: ``setting`` ("auto", "off" or a URL) and the broker URL.

    "auto" means the Celery broker when it is Redis (``redis://``, ``rediss://``, ``unix://``;
    a ``sentinel://`` or other broker gives no default), else no hand-off.
    """
    if setting is None or setting == "off":
        return None
    if setting != "auto":
        return setting
    first = (broker_url or "").split(";")[0].strip()  # Celery allows "url1;url2" fail-over lists
    return first if first.startswith(_REDIS_SCHEMES) else None


@dataclass
class HandoffItem:
    """One entry taken from the stream, shaped like a spool reader's item for the sender.

    ``path`` and ``end`` exist for senders written against spool items (they only log or pass
    them back to ``commit``); ``entry_id`` is what ``commit`` acknowledges.
    """

    entry_id: bytes
    payload: bytes | None
    kind: int = KIND_SPAN
    path: Path = Path("redis-handoff")
    end: int = 0
    raw: bytes | None = None  # an unreadable entry's fields, for the dead letter


class RecordSource(Protocol):
    """What the stopping shipper reads its spool through (the shipper's own spool reader)."""

    def next_batch(self) -> tuple[list[Any], bool]: ...

    def commit(self, items: list[Any]) -> None: ...


class HandoffStore:
    """One deployment's hand-off stream in Redis: add records, take, acknowledge."""

    def __init__(
        self, url: str, key: str, *, consumer: str | None = None, lease: float = DEFAULT_LEASE,
        max_bytes: int = DEFAULT_MAX_BYTES, client: redis.Redis | None = None,
    ) -> None:
        self.url = url
        self.key = key
        self.bytes_key = key + ":bytes"
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease = lease
        self.max_bytes = max_bytes
        self._client = client or redis.Redis.from_url(
            url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT,
            health_check_interval=0,
        )
        self._group_ready = False
        self._renewed_at = 0.0  # time.monotonic() of the last claim renewal
        # Entries delivered (2xx) whose acknowledgement failed: acknowledged again before the
        # next take, and never handed to the sender again by this store.
        self._owed: dict[bytes, HandoffItem] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    # -- adding --------------------------------------------------------------------------------

    def hand_off(self, records: Sequence[tuple[int, bytes]]) -> None:
        """Add ``(kind, payload)`` records in one transaction: all of them, or none.

        Raises HandoffUnavailable if Redis cannot be reached (nothing was added, unless the
        reply was lost: see the module docstring).
        """
        if not records:
            return
        pipe = self._client.pipeline(transaction=True)
        for kind, payload in records:
            pipe.xadd(self.key, {"v": FORMAT_VERSION, "k": str(kind), "p": payload})
        pipe.incrby(self.bytes_key, sum(len(p) for _, p in records))
        self._run(pipe.execute, "add records to")

    def stored_bytes(self) -> int:
        """Payload bytes in the stream (the counter ``hand_off`` and ``commit`` keep)."""
        value = self._run(lambda: self._client.get(self.bytes_key), "read the size of")
        return int(value or 0)

    def length(self) -> int:
        """Entries in the stream (taken but not yet acknowledged included)."""
        return int(self._run(lambda: self._client.xlen(self.key), "read the length of"))

    # -- draining ------------------------------------------------------------------------------

    def take(self, count: int) -> list[HandoffItem]:
        """Up to ``count`` entries to ship: ours still pending, others' stale claims, new ones."""
        self._ensure_group()
        if self._owed:
            self._acknowledge(list(self._owed.values()))
            self._owed.clear()
        # Entries stay in the stream until acknowledged: an empty stream means nothing pending
        # anywhere, so an idle drainer costs Redis one O(1) command per look.
        if not self.length():
            return []
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        own = self._run(lambda: self._client.xreadgroup(
            GROUP, self.consumer, {self.key: "0"}, count=count), "read from")
        entries += _entries_of(own)
        self._renewed_at = time.monotonic()
        if len(entries) < count:
            claimed = self._run(lambda: self._client.xautoclaim(
                self.key, GROUP, self.consumer, int(self.lease * 1000), "0-0",
                count=count - len(entries)), "claim from")
            entries += [(i, f) for i, f in claimed[1] if f is not None]
        if len(entries) < count:
            new = self._run(lambda: self._client.xreadgroup(
                GROUP, self.consumer, {self.key: ">"}, count=count - len(entries)), "read from")
            entries += _entries_of(new)
        return [self._item(entry_id, fields) for entry_id, fields in entries
                if entry_id not in self._owed]

    def claim_deadline(self) -> float:
        """``time.monotonic()`` until which the last ``take``'s claims are safely ours."""
        return self._renewed_at + self.lease / 2

    def commit(self, items: Iterable[HandoffItem]) -> None:
        """Done for good (2xx, or set aside): ``XACK`` + ``XDEL`` + ``DECRBY`` in one MULTI.

        Never raises: if Redis fails now, the entries are remembered and acknowledged before
        the next ``take`` (which will not return them to be sent again).
        """
        done = list(items)
        if not done:
            return
        try:
            self._acknowledge(done)
        except HandoffUnavailable as exc:
            logger.warning("celery-langfuse: %s; will acknowledge %d delivered entries later",
                           exc, len(done))
            self._owed.update((item.entry_id, item) for item in done)

    def _acknowledge(self, done: list[HandoffItem]) -> None:
        ids = [item.entry_id for item in done]
        pipe = self._client.pipeline(transaction=True)
        pipe.xack(self.key, GROUP, *ids)
        pipe.xdel(self.key, *ids)
        pipe.decrby(self.bytes_key, sum(len(item.payload or b"") for item in done))
        self._run(pipe.execute, "acknowledge entries in")

    def _item(self, entry_id: bytes, fields: dict[bytes, bytes]) -> HandoffItem:
        version, kind, payload = fields.get(b"v"), fields.get(b"k"), fields.get(b"p")
        if version != FORMAT_VERSION or payload is None or not (kind or b"").isdigit():
            logger.error(
                "celery-langfuse: hand-off entry %s in %s has an unknown format (fields %s); "
                "it is set aside", entry_id.decode(), self.key, sorted(fields)[:5],
            )
            return HandoffItem(entry_id, None, 0, raw=repr(fields).encode())
        return HandoffItem(entry_id, payload, int(kind or b"0"))

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise HandoffUnavailable(
                    f"Redis at {mask_url(self.url)} refused to create consumer group {GROUP} "
                    f"on {self.key}: {exc}") from exc
        except redis.RedisError as exc:
            raise HandoffUnavailable(
                f"cannot reach Redis at {mask_url(self.url)} ({type(exc).__name__}: {exc})"
            ) from exc
        self._group_ready = True

    def _run(self, call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._group_ready = False  # the stream was deleted under us: recreate next time
            raise HandoffUnavailable(
                f"Redis at {mask_url(self.url)} refused to {what} {self.key}: {exc}") from exc
        except redis.RedisError as exc:
            raise HandoffUnavailable(
                f"cannot reach Redis at {mask_url(self.url)} to {what} {self.key} "
                f"({type(exc).__name__}: {exc})") from exc


def _entries_of(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # XREADGROUP answers [[key, [(id, fields), ...]]] (RESP2, what our client speaks); an entry
    # deleted while pending comes back with no fields and is skipped.
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for _key, messages in reply or []:
        out += [(entry_id, fields) for entry_id, fields in messages if fields]
    return out


def handoff_remaining(
    store: HandoffStore, source: RecordSource, *, spool_dir: Path | str = "",
    deadline: float | None = None,
) -> int:
    """Move every unshipped span record of ``source`` into ``store``; return how many.

    Batch by batch: add to Redis, then commit the spool cursor. Stops, with one log line, when
    Redis is unreachable (the records stay on disk), when the stream holds ``max_bytes``, or at
    ``deadline`` (``time.monotonic()``).
    """
    moved = 0
    try:
        while True:
            items, _ = source.next_batch()
            if not items:
                break
            if deadline is not None and time.monotonic() >= deadline:
                logger.error(
                    "celery-langfuse: the stop's time ran out after handing off %d span "
                    "record(s); the rest stay in %s", moved, spool_dir)
                break
            records = [(int(getattr(i, "kind", KIND_SPAN) or KIND_SPAN), i.payload)
                       for i in items if i.payload is not None]
            size = sum(len(p) for _, p in records)
            if records and store.stored_bytes() + size > store.max_bytes:
                logger.error(
                    "celery-langfuse: hand-off stream %s at %s holds its maximum of %d bytes; "
                    "%d more span record(s) of this batch and any after it stay in %s",
                    store.key, mask_url(store.url), store.max_bytes, len(records), spool_dir,
                )
                break
            store.hand_off(records)
            source.commit(items)
            moved += len(records)
    except HandoffUnavailable as exc:
        logger.error(
            "celery-langfuse: could not hand off unshipped spans (%s); %d handed off, the rest "
            "stay in %s for the next worker on this disk or `python -m tracing drain`",
            exc, moved, spool_dir,
        )
        return moved
    if moved:
        logger.warning(
            "celery-langfuse: handed %d unshipped span record(s) to Redis stream %s at %s; "
            "the other workers will ship them", moved, store.key, mask_url(store.url),
        )
    return moved

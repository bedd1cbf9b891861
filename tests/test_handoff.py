"""The hand-off store (``tracing.shipping._handoff``) against a real redis-server and the
loopback receiver.

The store rows need no worker; the last rows run real workers on separate spool directories
("hosts") sharing one Redis, and stop one of them for good while Langfuse is down.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.support import RedisServer, free_port, spooled_span_count, wait_until
from tests.test_lifecycle import assert_all_once, run_generations
from tracing import load_config
from tracing._config import ConfigError
from tracing.shipping._handoff import (
    GROUP,
    HandoffItem,
    HandoffStore,
    deployment_key,
    handoff_remaining,
    mask_url,
    resolve_handoff_url,
)
from tracing.shipping._handoff_drain import HandoffDrainer, HandoffReader
from tracing.shipping._sending import BatchSender
from tracing.shipping._status import ShipperStats
from tracing.shipping._transport import HttpTransport
from tracing.spool import HEADER_SIZE, KIND_SPAN, read_dead_letters
from tracing.spool._attempts import OpenAttempt, closing_span
from tracing.spool._exporter import span_frame
from tracing.testing import LangfuseReceiver


def span_record(name: str) -> tuple[str, bytes]:
    """A real one-span KIND_SPAN payload named ``name``, and its observation id."""
    trace, span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    attempt = OpenAttempt(task_id=name, name=name, trace_id=trace, span_id=span,
                          parent_span_id=None, start_ns=1, attributes={})
    frame = span_frame(closing_span(attempt, "ok", level="DEFAULT", final_state="SUCCESS"))
    return span, frame[HEADER_SIZE:]


@dataclass
class FakeItem:
    payload: bytes | None


class ListSource:
    """A RecordSource over a list, batch by batch, remembering what was committed."""

    def __init__(self, payloads: list[bytes], batch: int = 3) -> None:
        self.payloads = payloads
        self.batch = batch
        self.committed: list[bytes] = []

    def next_batch(self) -> tuple[list[Any], bool]:
        start = len(self.committed)
        items = [FakeItem(p) for p in self.payloads[start:start + self.batch]]
        return items, len(items) == self.batch

    def commit(self, items: list[Any]) -> None:
        self.committed += [item.payload for item in items]


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[HandoffStore]:
    key = f"celery-langfuse:handoff:test-{uuid.uuid4().hex[:8]}"
    made = HandoffStore(redis_server.url, key, consumer="a")
    yield made
    redis_server.client.delete(key, key + ":bytes")
    made.close()


def test_records_round_trip_with_their_ids_and_are_deleted_after_commit(store):
    """Records handed off come back unchanged (span id first), and commit deletes them."""
    payloads = [span_record(f"s{i}")[1] for i in range(7)]
    source = ListSource(payloads)
    assert handoff_remaining(store, source) == 7
    assert source.committed == payloads
    assert store.length() == 7 and store.stored_bytes() == sum(map(len, payloads))
    items = store.take(100)
    assert [i.payload for i in items] == payloads and all(i.kind == KIND_SPAN for i in items)
    store.commit(items)
    assert store.length() == 0 and store.stored_bytes() == 0
    assert store.take(100) == []


def test_a_dead_shippers_claims_are_taken_over_after_the_lease(redis_server, store):
    """Entries a consumer took and never acknowledged go to another consumer only once the
    lease has passed; while it renews them (its own pending read), nobody else gets them."""
    store.lease = 0.3
    store.hand_off([(KIND_SPAN, b"x" * 30), (KIND_SPAN, b"y" * 30)])
    taken = store.take(10)
    assert len(taken) == 2
    other = HandoffStore(redis_server.url, store.key, consumer="b", lease=0.3)
    assert other.take(10) == [], "another consumer got entries still leased"
    claimed = cast(list[HandoffItem], wait_until(
        lambda: other.take(10), 10, "the other consumer to take over the stale claims"))
    assert [i.payload for i in claimed] == [b"x" * 30, b"y" * 30]
    assert store.take(10) == [], "the first consumer still holds what was taken over"
    other.commit(claimed)
    assert store.length() == 0
    other.close()


def test_own_pending_entries_are_taken_again_before_new_ones(store):
    """Entries not delivered stay with their consumer, and its next take returns them first."""
    store.hand_off([(KIND_SPAN, b"first")])
    assert [i.payload for i in store.take(10)] == [b"first"]
    store.hand_off([(KIND_SPAN, b"second")])
    assert [i.payload for i in store.take(10)] == [b"first", b"second"]
    pending = store._client.xpending(store.key, GROUP)
    assert pending["pending"] == 2


def test_redis_unreachable_leaves_the_records_on_disk_with_one_log_line(caplog):
    """With Redis down, nothing is committed and one error line names Redis and the spool."""
    store = HandoffStore(f"redis://:secret@127.0.0.1:{free_port()}/0", "k")
    source = ListSource([b"a", b"b", b"c", b"d"], batch=2)
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        assert handoff_remaining(store, source, spool_dir="/spool/here") == 0
    assert source.committed == []
    lines = [r.getMessage() for r in caplog.records if "hand off" in r.getMessage()]
    assert len(lines) == 1 and "/spool/here" in lines[0] and "secret" not in lines[0]


def test_the_cap_stops_the_handoff_with_a_log_line(store, caplog):
    """Past max_bytes in the stream, the hand-off stops and the rest stays on disk."""
    store.max_bytes = 10
    source = ListSource([b"1234", b"5678", b"abcd", b"efgh"], batch=2)
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        assert handoff_remaining(store, source, spool_dir="/s") == 2
    assert source.committed == [b"1234", b"5678"]
    assert any("maximum of 10 bytes" in r.getMessage() for r in caplog.records)


def test_the_stops_deadline_ends_the_handoff_with_a_log_line(store, caplog):
    """At the stop's deadline the hand-off stops; what is left stays on disk, and a line says so."""
    source = ListSource([b"a", b"b"], batch=1)
    with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
        assert handoff_remaining(store, source, spool_dir="/s", deadline=time.monotonic()) == 0
    assert source.committed == [] and store.length() == 0
    assert any("time ran out" in r.getMessage() for r in caplog.records)


def test_an_acknowledgement_lost_after_delivery_is_never_resent(store, monkeypatch):
    """If XACK fails after a 2xx, the entries are acknowledged later, not shipped again."""
    store.hand_off([(KIND_SPAN, b"p")])
    items = store.take(10)
    real = store._acknowledge
    monkeypatch.setattr(store, "_acknowledge", lambda done: (_ for _ in ()).throw(
        __import__("tracing.shipping._handoff", fromlist=["x"]).HandoffUnavailable("down")))
    store.commit(items)  # never raises
    monkeypatch.setattr(store, "_acknowledge", real)
    assert store.take(10) == []
    assert store.length() == 0


def test_unreadable_entries_are_set_aside(store, tmp_path):
    """An entry in an unknown format goes to the local dead-letter folder and is removed."""
    store._client.xadd(store.key, {"v": "9", "x": "?"})
    sent: list[Any] = []
    drainer = HandoffDrainer(store, lambda items, deadline: sent.append(items) or True,
                             spool_dir=tmp_path)
    assert drainer.drain_once() == 1
    assert sent == [] and store.length() == 0
    (letter,) = read_dead_letters(tmp_path)
    assert "unreadable" in letter.reason


def drainer_for(store: HandoffStore, receiver: LangfuseReceiver, spool: Path) -> HandoffDrainer:
    config = load_config(environ={}, public_key=receiver.public_key,
                         secret_key=receiver.secret_key, base_url=receiver.base_url,
                         spool_dir=str(spool))
    sender = BatchSender(config, HttpTransport(config), cast(Any, HandoffReader(store, spool)),
                         ShipperStats())
    return HandoffDrainer(store, sender.deliver, spool_dir=spool, ready=sender.ready,
                          idle_interval=0)


def test_drain_keeps_the_delivery_rules_poison_and_503(store, receiver, tmp_path):
    """Drained under the shipper's rules: a 503 keeps the entries, a poison span goes to the
    dead letters alone, and every other span arrives exactly once."""
    records = [span_record(f"span-{i}") for i in range(20)]
    store.hand_off([(KIND_SPAN, payload) for _, payload in records])
    receiver.set_poison(lambda span: span["name"] == "span-7")
    receiver.fail_next(1, 503)
    drainer = drainer_for(store, receiver, tmp_path)
    assert drainer.drain_once() == 0  # 503: kept, backing off
    assert store.length() == 20
    wait_until(lambda: drainer.drain_once() or store.length() == 0, 30, "the stream to drain")
    delivered = {o.id for o in receiver.observations}
    assert delivered == {span for span, _ in records} - {records[7][0]}
    assert receiver.duplicates() == {}
    (letter,) = read_dead_letters(tmp_path)
    assert letter.payloads[0][:8].hex() == records[7][0]
    assert store.length() == 0 and store.stored_bytes() == 0


def test_stream_key_and_url_settings():
    """One stream per Langfuse endpoint and key; "auto" follows a Redis broker; bad values
    raise a ConfigError naming the variable."""
    assert deployment_key("https://a", "pk1") == deployment_key("https://a", "pk1")
    assert deployment_key("https://a", "pk1") != deployment_key("https://a", "pk2")
    assert resolve_handoff_url("auto", "redis://r:6379/0") == "redis://r:6379/0"
    assert resolve_handoff_url("auto", "rediss://r/0;redis://s/0") == "rediss://r/0"
    assert resolve_handoff_url("auto", "amqp://guest@rabbit//") is None
    assert resolve_handoff_url(None, "redis://r/0") is None
    assert resolve_handoff_url("redis://x/3", "amqp://") == "redis://x/3"
    assert mask_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert load_config(environ={}).handoff_url == "auto"
    assert load_config(environ={"CELERY_LANGFUSE_HANDOFF_URL": "off"}).handoff_url is None
    assert load_config(environ={"CELERY_LANGFUSE_HANDOFF_URL": "redis://h:1/2"}).handoff_url \
        == "redis://h:1/2"
    with pytest.raises(ConfigError, match="CELERY_LANGFUSE_HANDOFF_URL='http://h'"):
        load_config(environ={"CELERY_LANGFUSE_HANDOFF_URL": "http://h"})



# --------------------------------------------------------------------------- real workers

N = 20


def _shipped(spool: Path) -> int:
    return int(json.loads((spool / "shipper-status.json").read_text())["shipped_spans"])


@pytest.mark.slow
def test_a_worker_gone_for_good_is_shipped_by_another_host(
    start_worker, worker_env, receiver, tmp_path
):
    """Worker A stops warm while Langfuse is down and its spool directory is deleted; every
    generation and task observation of A's tasks arrives exactly once, shipped by worker B
    (another spool directory, another "host") from the deployment's Redis."""
    receiver.down()
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    a = start_worker(env={"CELERY_LANGFUSE_SPOOL_DIR": str(host_a),
                          "CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "1"})
    ids = run_generations(worker_env, N)
    wait_until(lambda: spooled_span_count(host_a) >= 2 * N, 30, f"{2 * N} spans in A's spool")
    b = start_worker(env={"CELERY_LANGFUSE_SPOOL_DIR": str(host_b),
                          "TEST_QUEUE": worker_env["TEST_QUEUE"] + "-b"})
    assert a.stop() == 0
    assert f"handed {2 * N} unshipped span record(s)" in a.output, a.output_tail()
    shutil.rmtree(host_a)  # the container and its disk are gone
    receiver.up()
    assert_all_once(receiver, ids, timeout=60)
    assert b.stop() == 0
    assert receiver.duplicates() == {}
    assert _shipped(host_b) == 2 * N, "B did not ship A's records"


@pytest.mark.slow
def test_redis_unreachable_at_handoff_keeps_the_records_on_disk(
    start_worker, worker_env, receiver, spool_dir
):
    """With the hand-off Redis unreachable, a stopping worker still exits in time, logs one
    line, and its records stay on disk, where the next worker ships them exactly once."""
    receiver.down()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    a = start_worker(env={"CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "1",
                          "CELERY_LANGFUSE_HANDOFF_URL": dead_redis})
    ids = run_generations(worker_env, N)
    wait_until(lambda: spooled_span_count(spool_dir) >= 2 * N, 30, f"{2 * N} spans spooled")
    started = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - started < 20, "shutdown must stay bounded when Redis is down"
    assert a.output.count("could not hand off") == 1, a.output_tail()
    assert spooled_span_count(spool_dir) == 2 * N
    receiver.up()
    start_worker(env={"CELERY_LANGFUSE_HANDOFF_URL": "off"})
    assert_all_once(receiver, ids)

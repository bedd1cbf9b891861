"""The shipper in its own process: ships, wakes, stops bounded, is restarted when it dies,
leaves when its parent does, and the main process still closes a dead child's attempt."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider

from tests.support import wait_until
from tracing import _sdk, load_config
from tracing.shipping._shipproc import ShipperProcess
from tracing.spool import SegmentWriter, ShipperLock
from tracing.spool._attempts import OpenAttempt
from tracing.spool._exporter import SpoolExporter
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.slow


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def write_spans(spool: Path) -> Iterator[Callable[[int, str], list[str]]]:
    """Write ``n`` real SDK spans named ``<prefix>-<i>`` into the spool; their ids."""
    key = f"pk-lf-{uuid.uuid4().hex[:8]}"
    client = Langfuse(public_key=key, secret_key="sk", base_url="http://127.0.0.1:9",
                      span_exporter=SpoolExporter(SegmentWriter(spool)),
                      tracer_provider=TracerProvider())

    def write(n: int, prefix: str) -> list[str]:
        ids = []
        for i in range(n):
            obs = client.start_observation(name=f"{prefix}-{i}")
            obs.end()
            ids.append(obs.id)
        client.flush()
        return ids

    yield write
    client.shutdown()
    _sdk.forget_client(key)


@pytest.fixture
def shipper(receiver: LangfuseReceiver, spool: Path) -> Iterator[ShipperProcess]:
    config = load_config(environ={}, public_key=receiver.public_key,
                         secret_key=receiver.secret_key, base_url=receiver.base_url,
                         spool_dir=str(spool), shutdown_timeout=5)
    process = ShipperProcess(config, SpoolExporter(SegmentWriter(spool)))
    process.start()
    yield process
    process.stop(1)


def lock_is_free(spool: Path) -> bool:
    lock = ShipperLock(spool)
    if lock.acquire():
        lock.release()
        return True
    return False


def test_ships_from_its_own_process_and_stops(receiver, spool, shipper, write_spans):
    """Spans written by this process arrive once, shipped by a child holding the spool lock;
    after stop the child is gone and the lock is free."""
    ids = write_spans(20, "p")
    shipper.wake()
    receiver.wait_for_count(20, timeout=30)
    assert sorted(o.id for o in receiver.observations) == sorted(ids)
    assert not lock_is_free(spool), "the shipping process holds the lock"
    state = wait_until(lambda: (s := shipper.state())["shipped_spans"] == 20 and s, 10,
                       "the status to catch up")
    assert state["shipper_pid"] != os.getpid()  # type: ignore[index]
    proc = shipper._proc
    shipper.stop(2)
    assert proc is not None and proc.poll() == 0
    assert lock_is_free(spool) and receiver.duplicates() == {}


def test_a_killed_shipper_process_is_restarted(receiver, spool, shipper, write_spans):
    """SIGKILL the shipping process: the supervisor starts another, which ships what is new."""
    first = write_spans(5, "a")
    shipper.wake()
    # killed only once its cursor is committed: a kill between Langfuse's 200 and the cursor
    # is the one case that may resend (an unknown outcome)
    wait_until(lambda: shipper.state()["shipped_spans"] == 5, 30, "5 spans shipped")
    victim = shipper._proc
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: shipper._proc is not victim and shipper.restarts == 1, 15,
               "a restarted shipper process")
    second = write_spans(5, "b")
    shipper.wake()
    receiver.wait_for_count(10, timeout=30)
    assert sorted(o.id for o in receiver.observations) == sorted(first + second)
    assert receiver.duplicates() == {}


def test_the_shipper_leaves_when_its_parent_is_gone(receiver, spool, shipper, write_spans):
    """End of file on the control pipe (the worker died) makes the child ship and exit."""
    ids = write_spans(3, "eof")
    proc, control = shipper._proc, shipper._control
    assert proc is not None and control is not None
    shipper._stopping.set()  # as if the supervisor had died with its process
    control.close()
    assert proc.wait(15) == 0
    assert sorted(o.id for o in receiver.observations) == sorted(ids)
    assert lock_is_free(spool)


def test_main_process_closes_a_dead_childs_attempt(receiver, spool, shipper):
    """close_attempt in the main process writes the closing span; the child ships it."""
    attempt = OpenAttempt(task_id="t-lost", name="t.generate", trace_id="ab" * 16,
                          span_id="cd" * 8, parent_span_id=None, start_ns=1, attributes={})
    writer = SegmentWriter(spool)
    writer.append(attempt.frame())
    assert shipper.close_attempt("t-lost", "worker lost: killed", level="ERROR",
                                 final_state="FAILURE")
    [closed] = receiver.wait_for_count(1, timeout=30)
    assert closed.id == "cd" * 8 and closed.level == "ERROR"
    assert shipper.close_attempt("t-lost", "again")  # once per task id
    assert not shipper.close_attempt("t-unknown", "never opened")
    assert len(receiver.observations) == 1


def test_sigterm_to_the_process_group_leaves_shipping_to_the_worker(receiver, spool, shipper,
                                                                     write_spans):
    """A SIGTERM that reaches the shipper too (sent to the worker's process group) does not
    end it: it keeps shipping until the worker says stop, so the last attempt happens."""
    proc = shipper._proc
    assert proc is not None
    # it takes the lock after it set its signal handlers
    wait_until(lambda: not lock_is_free(spool), 15, "the shipping process to take the lock")
    os.kill(proc.pid, signal.SIGTERM)
    ids = write_spans(3, "after-term")
    shipper.wake()
    receiver.wait_for_count(3, timeout=30)
    assert proc.poll() is None and shipper.restarts == 0
    shipper.stop(2)
    assert proc.returncode == 0
    assert sorted(o.id for o in receiver.observations) == sorted(ids)


def test_an_attempt_another_process_closed_is_not_closed_again(tmp_path):
    """If the shipper already wrote an attempt's closing span, the main process's
    close_attempt says it is closed and writes nothing (no second observation)."""
    from tracing.spool._attempts import AttemptCloser, AttemptIndex, closing_span
    from tracing.spool._exporter import span_frame

    spool = tmp_path / "spool"
    attempt = OpenAttempt(task_id="t-raced", name="t.generate", trace_id="ab" * 16,
                          span_id="cd" * 8, parent_span_id=None, start_ns=1, attributes={})
    writer = SegmentWriter(spool)
    writer.append(attempt.frame())
    index = AttemptIndex(spool)
    index.refresh()  # the main process saw it open
    writer.append(span_frame(closing_span(attempt, "worker lost")))  # the shipper closed it
    written: list[bytes] = []
    closer = AttemptCloser(index, written.append)
    assert closer.close("t-raced", "hard time limit")
    assert written == []
    assert not closer.close("t-never-seen", "lost")

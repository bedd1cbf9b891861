"""celery beat: each periodic run starts a trace named after its schedule entry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import Process
from tracing.testing import LangfuseReceiver, Observation

pytestmark = pytest.mark.slow


def test_beat_runs_are_traces_named_after_their_entry(
    start_worker, worker_env: dict[str, str], receiver: LangfuseReceiver, tmp_path: Path
) -> None:
    """Tasks sent by a real `celery beat` (same app module, no Langfuse keys) are each a
    trace of their own, named after the schedule entry, tagged `beat`, with the entry in the
    trace metadata; beat itself creates no spool."""
    worker = start_worker()
    beat_spool = tmp_path / "beat-spool"
    beat_env = {k: v for k, v in worker_env.items() if not k.startswith("LANGFUSE_")}
    beat_env.update({"TEST_BEAT_EVERY": "0.5", "CELERY_LANGFUSE_SPOOL_DIR": str(beat_spool),
                     "LANGFUSE_PUBLIC_KEY": "", "LANGFUSE_SECRET_KEY": ""})
    beat = Process("beat", [sys.executable, "-m", "celery", "-A", "tests.apps.traced_app",
                            "beat", "-s", str(tmp_path / "schedule"), "--max-interval", "1",
                            "--loglevel=INFO"], beat_env)
    try:
        def beat_runs(obs: list[Observation]) -> list[Observation]:
            return [o for o in obs if o.name == "t.add" and o.trace_name == "add-every-tick"]

        runs = beat_runs(receiver.wait_for(lambda obs: len(beat_runs(obs)) >= 2, timeout=30,
                                           what="two beat runs of t.add"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nbeat's output:\n{beat.output_tail(30)}") from None
    finally:
        beat.kill_group()
    assert worker.stop() == 0
    first, second = runs[:2]
    assert first.trace_id != second.trace_id
    for run in (first, second):
        trace = receiver.trace(run.trace_id)
        assert trace.name == "add-every-tick" and "beat" in trace.tags
        assert run.trace_metadata.get("beat_entry") == "add-every-tick"
    assert not beat_spool.exists()

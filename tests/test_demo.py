"""`make demo` end to end: `python -m worker.demo` as a newcomer would run it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180


def _run_demo() -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.demo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the demo then stops the Redis, server and worker it started.
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"the demo did not finish within {TIMEOUT}s:\n{output}")
    return proc.returncode, output


@pytest.mark.slow
def test_demo_prints_every_trace_and_exits_zero() -> None:
    """The demo exits 0 after printing agent, generation, tool, failed and retried
    observations, a beat run's trace, a score and queue waits, an experiment's summary
    table and run score, and a summary with no duplicates and every task delivered."""
    code, output = _run_demo()
    assert code == 0, output
    for marker in ("[agent]", "[generation]", "[tool]"):
        assert marker in output, output
    assert re.search(r"tasks\.classify \[span\] ERROR .*InvalidJobInput", output), output
    assert re.search(r'tasks\.summarize \[span\] WARNING .*"retry: RetryableLLMError', output)
    summary = re.search(r"^summary: (\d+) traces, .* 0 duplicates$", output, re.MULTILINE)
    # 10 jobs, one beat run and the experiment's 6 items (each item its own trace)
    assert summary and int(summary.group(1)) == 17, output
    assert re.search(r"^  label_match +6 ", output, re.MULTILINE), output
    assert re.search(r"^score: accuracy=[\d.]+ on experiment run \w+", output, re.MULTILINE)
    assert "delivery: every enqueued task has an observation" in output, output
    assert re.search(r"^trace \w+ name='hourly-digest' tags=\['beat'\]$", output, re.MULTILINE)
    assert re.search(r"^score: helpful=1(\.0)? on trace \w+", output, re.MULTILINE), output
    assert re.search(r"\(waited \d+ ms in the queue\)", output), output

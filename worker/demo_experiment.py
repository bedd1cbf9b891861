"""The demo's experiment: a small Langfuse dataset run as Celery tasks, with its summary.

``make demo`` calls :func:`run_experiment_demo` while its worker runs: it puts the dataset
``support-tickets`` (``tasks.experiments.TICKETS``) into the capture server (``POST
/_receiver/datasets``, the receiver's stand-in for creating a dataset in Langfuse), then runs,
from a process of its own, exactly what a user would type::

    celery -A worker langfuse experiment --dataset support-tickets \\
        --task tasks.classify_item --evaluator tasks.experiments:label_match \\
        --run-evaluator tasks.experiments:accuracy --run-name demo-<random>

and prints the summary table it ends with. Each item's task is the root of its own trace
(the trees printed at the end of the demo), linked to the run by its experiment attributes;
the scores travel with the worker's spool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping

from tasks.experiments import TICKETS

DATASET = "support-tickets"
TIMEOUT = 120.0


def run_experiment_demo(env: Mapping[str, str], capture_url: str,
                        log: Callable[[str], None]) -> str:
    """Create the dataset, run the experiment CLI, log its summary; the run name. Raises
    RuntimeError (with the command's output) if it does not end with every item done."""
    request = urllib.request.Request(
        f"{capture_url}/_receiver/datasets", method="POST",
        data=json.dumps({"name": DATASET, "items": TICKETS}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
    run_name = f"demo-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, "-m", "celery", "-A", "worker", "langfuse", "experiment",
            "--dataset", DATASET, "--task", "tasks.classify_item",
            "--evaluator", "tasks.experiments:label_match",
            "--run-evaluator", "tasks.experiments:accuracy", "--run-name", run_name]
    log(f"experiment: {len(TICKETS)} dataset items as Celery tasks "
        f"(celery -A worker langfuse experiment --dataset {DATASET} ...)")
    started = time.monotonic()
    done = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0 or "experiment " not in done.stdout:
        raise RuntimeError(f"the experiment failed ({done.returncode}):\n{done.stdout}\n"
                           f"{done.stderr[-2000:]}")
    log("\n".join("  " + line for line in done.stdout.rstrip().splitlines()))
    log(f"experiment run {run_name!r} done in {time.monotonic() - started:.1f} s")
    return run_name

"""A caller process for the experiment tests: runs one experiment and prints what it got.

``python -m tests.apps.experiment_caller RUN_NAME N [--dataset NAME] [--lost]
[--resend-unfinished]``: runs ``x.answer`` over N local items (item 3 fails) or over the
receiver's dataset NAME (``--lost``: item 0 marked published first, as if its message had been
lost), with the evaluators of
``tests.apps.experiment_app``; prints ``settled <done>/<total>`` as items settle, then one JSON
line: the result's items (task id, state, error, evaluations), run evaluations, experiment id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import tracing
from tests.apps.experiment_app import accuracy, answer, exact_match, length


def local_items(count: int) -> list[dict[str, Any]]:
    sleep = os.environ.get("TEST_ITEM_SLEEP", "0")
    return [{"input": {"question": "fail" if i == 3 else f"q{i}", "sleep": sleep},
             "expected_output": f"Q{i}" if i % 2 == 0 else "wrong",
             "metadata": {"position": i}} for i in range(count)]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_name, count = argv[0], int(argv[1])
    if "--dataset" in argv:
        from langfuse import Langfuse

        client = Langfuse(tracing_enabled=False)
        data: Any = client.get_dataset(argv[argv.index("--dataset") + 1])
    else:
        data = local_items(count)

    if "--lost" in argv:  # a published mark for item 0 whose message never reached Redis
        from tracing.experiments._experiment_items import items_of, task_id_for
        from tracing.experiments._experiment_ledger import Ledger

        item = items_of(data).items[0]
        Ledger(answer.app.backend, run_name, None).mark_sent(task_id_for(run_name, item))

    def progress(done: int, total: int, _: Any) -> None:
        print(f"settled {done}/{total}", flush=True)

    result = tracing.run_experiment(
        name="caller-test", data=data, task=answer, evaluators=[exact_match, length],
        run_evaluators=[accuracy], run_name=run_name, description="a test run",
        metadata={"suite": "tests"}, max_concurrency=int(os.environ.get("TEST_CONCURRENCY", "4")),
        on_progress=progress, resend_unfinished="--resend-unfinished" in argv)
    print(result.format(), file=sys.stderr, flush=True)
    print(json.dumps({
        "experiment_id": result.experiment_id,
        "experiment_url": result.experiment_url,
        "items": [{"task_id": r.task_id, "state": r.state, "error": r.error,
                   "trace_id": r.trace_id, "output": r.output,
                   "evaluations": {e.name: e.value for e in r.evaluations}}
                  for r in result.item_results],
        "run_evaluations": {e.name: e.value for e in result.run_evaluations},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

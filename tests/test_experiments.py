"""Experiments on real workers: run_experiment sends each item as a Celery task, links each
item's trace to the run, scores once through the spool, and resumes after the caller died."""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

import pytest

import tracing
from tests.support import Process, wait_until
from tracing.instrumentation._scores import pending_scores
from tracing.testing import LangfuseReceiver, experiment_fields

APP = "tests.apps.experiment_app"
CALLER = [sys.executable, "-m", "tests.apps.experiment_caller"]


def run_caller(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
    """Run the caller process to its end: its JSON result and its output."""
    caller = Process("experiment caller", [*CALLER, *args], env)
    try:
        line = caller.wait_for_line(lambda text: text.startswith("{"), timeout, "its result")
        assert caller.proc.wait(30) == 0, caller.output_tail()
    finally:
        caller.kill_group()
    return json.loads(line), caller.output


def assert_linked(receiver: LangfuseReceiver, result: dict[str, Any], run_name: str) -> None:
    """Every sent item is exactly one experiment item of the run, rooted at its task."""
    items = receiver.experiment_items(result["experiment_id"])
    sent = [i for i in result["items"] if i["state"] != "SKIPPED"]
    assert len(items) == len(sent), (len(items), len(sent))
    by_trace = {o.trace_id: o for o in items}
    for item in sent:
        root = by_trace[item["trace_id"]]
        assert root.id == tracing.root_observation_id_for(item["task_id"])
        assert root.name == "x.answer" and root.parent_observation_id is None
        fields = experiment_fields(root)
        assert fields is not None and fields.name == run_name
        assert fields.description == "a test run" and fields.metadata == {"suite": "tests"}
        assert root.environment == "sdk-experiment"


def expected_scores(result: dict[str, Any]) -> Counter[tuple[str | None, str]]:
    """One score per item evaluation (on the trace) and one per run evaluation."""
    wanted: Counter[tuple[str | None, str]] = Counter()
    for item in result["items"]:
        for name in item["evaluations"]:
            wanted[(item["trace_id"], name)] += 1
    for name in result["run_evaluations"]:
        wanted[(None, name)] += 1
    return wanted


def received_scores(receiver: LangfuseReceiver) -> Counter[tuple[str | None, str]]:
    return Counter((s.get("traceId"), str(s["name"])) for s in receiver.scores)  # type: ignore[misc]


@pytest.mark.slow
def test_an_experiment_whose_langfuse_is_down_scores_every_item_once_it_is_back(
    start_worker, worker_env, receiver
):
    """8 local items on 2 workers while Langfuse is down: every item is a result (item 3 with
    its error), every item's trace is linked to the run once Langfuse is back, and every
    evaluation arrives exactly once as a score on its item's task observation."""
    start_worker(APP)
    start_worker(APP)
    receiver.down()
    result, output = run_caller(worker_env, "down-run", "8")
    assert [i["state"] for i in result["items"]].count("SUCCESS") == 7, output
    failed = result["items"][3]
    assert failed["state"] == "FAILURE" and failed["error"] == "ValueError: asked to fail"
    assert result["items"][0]["evaluations"] == {"exact_match": 1.0, "length": 2}
    assert result["run_evaluations"] == {"accuracy": pytest.approx(4 / 7)}
    assert "1 of 8 items failed" in output and "exact_match" in output
    receiver.up()
    wanted = expected_scores(result)
    wait_until(lambda: received_scores(receiver) == wanted, 60,
               f"{sum(wanted.values())} scores, each once")
    receiver.wait_for(lambda obs: len(receiver.experiment_items()) >= 8, timeout=60,
                      what="8 experiment items")
    assert_linked(receiver, result, "down-run")
    item_scores = [s for s in receiver.scores if s.get("traceId")]
    for score in item_scores:
        task_id = next(i["task_id"] for i in result["items"] if i["trace_id"] == score["traceId"])
        assert score["observationId"] == tracing.root_observation_id_for(task_id)
    [run_score] = [s for s in receiver.scores if not s.get("traceId")]
    assert run_score["datasetRunId"] == result["experiment_id"]


def unfinished(worker: Process) -> int:
    """Items a worker received and did not finish (by its log)."""
    lines = worker.output.splitlines()
    received = sum(1 for line in lines if "Task x.answer[" in line and " received" in line)
    return received - sum(1 for line in lines if "Task x.answer[" in line
                          and (" succeeded in " in line or " raised " in line))


@pytest.mark.slow
def test_a_run_survives_its_caller_and_a_worker_killed_mid_run(start_worker, worker_env, receiver):
    """16 items on 2 workers: one worker is SIGKILLed while it runs an item and the caller is
    SIGKILLed after 4 items settled; calling again with the same run name settles every item
    exactly once (finished ones reused, not sent again), links every item's trace, and
    delivers every score once."""
    env = {**worker_env, "TEST_ITEM_SLEEP": "0.4"}
    start_worker(APP)
    # One process, prefetch 1, late acks: while it runs an item it fetches no other message.
    # (Killed while fetching, a Redis worker loses the message it popped: kombu records it as
    # unacknowledged only after BRPOP returned; resend_unfinished is for that.)
    doomed = start_worker(APP, concurrency=1)
    caller = Process("experiment caller", [*CALLER, "killed-run", "16"], env)
    try:
        caller.wait_for_line("settled 4/16", 60)
        wait_until(lambda: unfinished(doomed) > 0, 30, "the doomed worker running an item")
        doomed.kill_group()
        assert unfinished(doomed) > 0
    finally:
        caller.kill_group()
    first_sent = Counter(line for line in caller.output.splitlines() if line.startswith("settled"))
    result, output = run_caller(env, "killed-run", "16")
    assert "resumed:" in output, output
    assert len({i["task_id"] for i in result["items"]}) == 16
    assert [i["state"] for i in result["items"]].count("SUCCESS") == 15, output
    assert result["items"][3]["error"] == "ValueError: asked to fail"
    assert all(i["evaluations"] for i in result["items"] if i["state"] == "SUCCESS")
    wanted = expected_scores(result)
    wait_until(lambda: received_scores(receiver) == wanted, 60,
               f"{sum(wanted.values())} scores, each once")
    wait_until(lambda: len(receiver.experiment_items(result["experiment_id"])) == 16, 60,
               "16 experiment items")
    assert_linked(receiver, result, "killed-run")
    assert max(first_sent.values()) == 1


@pytest.mark.slow
def test_a_dataset_run_links_items_to_the_dataset_and_a_second_call_sends_nothing(
    start_worker, worker_env, receiver, spool_dir
):
    """A Langfuse dataset (fetched with get_dataset from the receiver) as data: each item's
    observation names the dataset, its item id and expected output, under the server's
    experiment id; calling again with the same run name sends no task and writes no score."""
    from tracing.experiments._experiment_items import server_experiment_id

    dataset = receiver.add_dataset("capitals", [
        {"input": {"question": f"c{i}"}, "expected_output": f"C{i}", "metadata": {"n": i}}
        for i in range(4)])
    worker = start_worker(APP)
    result, _ = run_caller(worker_env, "dataset-run", "0", "--dataset", "capitals")
    assert result["experiment_id"] == server_experiment_id("demo-project", dataset["id"],
                                                           "dataset-run")
    assert result["experiment_url"].endswith(f"baseline={result['experiment_id']}")
    assert [i["evaluations"]["exact_match"] for i in result["items"]] == [1.0] * 4
    wanted = expected_scores(result)
    wait_until(lambda: received_scores(receiver) == wanted, 60, "the scores, each once")
    wait_until(lambda: len(receiver.experiment_items(result["experiment_id"])) == 4, 60,
               "4 experiment items")
    assert_linked(receiver, result, "dataset-run")
    item_ids = {row["id"] for row in receiver._dataset_items["capitals"]}
    for root in receiver.experiment_items(result["experiment_id"]):
        fields = experiment_fields(root)
        assert fields is not None and fields.dataset_id == dataset["id"]
        assert fields.item_id in item_ids and fields.item_metadata.keys() == {"n"}
        assert fields.item_expected_output == f"C{fields.item_metadata['n']}"
        assert root.metadata["dataset_item_id"] == fields.item_id
    executed = worker.output.count("Task x.answer[")
    again, output = run_caller(worker_env, "dataset-run", "0", "--dataset", "capitals")
    assert "resumed: 4 item(s) finished before, 0 in flight, 0 to send" in output, output
    assert [i["evaluations"] for i in again["items"]] == [i["evaluations"] for i in result["items"]]
    assert again["run_evaluations"] == result["run_evaluations"]
    assert worker.output.count("Task x.answer[") == executed
    # Whatever the second call wrote to the spool is shipped once nothing is pending there.
    wait_until(lambda: pending_scores(spool_dir) == 0, 30, "the spool's scores shipped")
    assert received_scores(receiver) == wanted


@pytest.mark.slow
def test_the_cli_runs_a_dataset_with_a_progress_bar_and_a_summary_table(
    start_worker, worker_env, receiver
):
    """`celery -A app langfuse experiment --dataset ... --task ... --evaluator module:func`
    runs the dataset on the workers, shows a progress bar and ends with a summary table;
    an item that fails makes the exit status 1 and is named."""
    receiver.add_dataset("cli-set", [{"input": {"question": q}, "expected_output": q.upper()}
                                     for q in ("a", "b", "fail")])
    start_worker(APP)
    command = [sys.executable, "-m", "celery", "-A", APP, "langfuse", "experiment",
               "--dataset", "cli-set", "--task", "x.answer", "--run-name", "cli-run",
               "--evaluator", f"{APP}:exact_match", "--run-evaluator", f"{APP}:accuracy",
               "--max-concurrency", "2"]
    cli = Process("celery langfuse experiment", command, worker_env)
    try:
        assert cli.proc.wait(120) == 1, cli.output_tail()
    finally:
        cli.kill_group()
    cli.wait_for_line("failed: task", 10)
    output = cli.output
    assert "cli-set: items" in output, output  # the bar's label (no TTY: no redraws)
    table = output[output.index("count"):]
    assert "items" in table and "failed" in table, table
    assert any(line.split()[:4] == ["exact_match", "2", "1.000", "1.000"]
               for line in table.splitlines()), table
    assert "run: accuracy" in table and "ValueError: asked to fail" in table


@pytest.mark.slow
def test_resend_unfinished_sends_an_item_whose_message_was_lost(start_worker, worker_env):
    """An item marked published whose message never arrived (a worker killed without late
    acknowledgement) is sent again by a call with resend_unfinished, and settles."""
    start_worker(APP)
    result, output = run_caller(worker_env, "lost-run", "2", "--lost", "--resend-unfinished")
    assert [i["state"] for i in result["items"]] == ["SUCCESS", "SUCCESS"], output
    assert result["items"][0]["output"] == {"answer": "Q0"}

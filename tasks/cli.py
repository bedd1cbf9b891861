"""Producer CLI and `enqueue()`: send LLM jobs to the broker and print where their trace is.

    python -m tasks enqueue summarize --text "..." [--user-id U --session-id S --tag T]
    python -m tasks enqueue summarize --text "..." --simulate-rate-limits 2   (shows retries)
    python -m tasks enqueue classify --text "..." --label billing --label technical
    python -m tasks enqueue agent --question "What is 17 * 23 + 4?"
    python -m tasks enqueue chord --text "..." --text "..."
    python -m tasks enqueue chain --text "..." --label a --label b
    python -m tasks score TASK_ID NAME VALUE [--comment C]

The producer needs no task code: it sends by task name. Environment: CELERY_BROKER_URL
(default redis://localhost:6379/0), CELERY_RESULT_BACKEND (default redis://localhost:6379/1,
like the worker), LANGFUSE_BASE_URL (to print a link to the trace).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import click
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import GroupResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

import tracing

from .validation import InvalidJobInput, int_arg, labels_arg, text_arg
from .workflows import classify_then_summarize, summarize_many

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
# Same default as the worker (worker/app.py): --wait and chords need the worker's backend.
DEFAULT_RESULT_BACKEND = "redis://localhost:6379/1"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EnqueueResult:
    """Where a sent job went: the id of the task whose result is the job's (a chain's last
    link, a chord's callback), the trace id, the trace URL, and the id the trace id is
    derived from (`tracing.trace_id_for(root_id)`: a task's own id, a chain's first link, a
    chord's group id)."""

    task_id: str
    trace_id: str
    url: str | None
    root_id: str


def producer_app(env: Mapping[str, str] | None = None) -> Celery:
    """A minimal Celery app for sending: broker and result backend from the environment."""
    env = os.environ if env is None else env
    broker = env.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL
    app = Celery(
        "tasks-producer", broker=broker, backend=env.get("CELERY_RESULT_BACKEND") or broker
    )
    # A producer facing a dead broker should say so in seconds, not retry for minutes.
    app.conf.broker_connection_timeout = 5
    retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
    app.conf.task_publish_retry_policy = retry_policy
    app.conf.redis_socket_connect_timeout = 5
    # The Redis result backend subscribes at send time and otherwise retries for ~20 s.
    app.conf.result_backend_transport_options = {"retry_policy": retry_policy}
    return app


def _summarize(text: Any, max_sentences: Any = 3, simulate_rate_limits: Any = 0) -> dict[str, Any]:
    kwargs = {
        "text": text_arg("text", text),
        "max_sentences": int_arg("max_sentences", max_sentences, low=1, high=20),
    }
    limits = int_arg("simulate_rate_limits", simulate_rate_limits, low=0, high=10)
    if limits:  # only when asked, so ordinary messages stay what older workers accept
        kwargs["simulate_rate_limits"] = limits
    return kwargs


def _classify(text: Any, labels: Any) -> dict[str, Any]:
    return {"text": text_arg("text", text), "labels": labels_arg("labels", labels)}


def _agent(question: Any, max_steps: Any = 4) -> dict[str, Any]:
    return {
        "question": text_arg("question", question, max_chars=2_000),
        "max_steps": int_arg("max_steps", max_steps, low=1, high=10),
    }


# Job name -> (task name, kwargs validator) for single tasks.
TASK_JOBS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "summarize": ("tasks.summarize", _summarize),
    "classify": ("tasks.classify", _classify),
    "agent": ("tasks.research_agent", _agent),
}
# Job name -> canvas builder for workflows.
CANVAS_JOBS: dict[str, Callable[..., Signature]] = {
    "chain": classify_then_summarize,
    "chord": summarize_many,
}
JOB_NAMES = (*TASK_JOBS, *CANVAS_JOBS)


def _bind(job_name: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse missing or unknown arguments with a message naming them."""
    try:
        inspect.signature(fn).bind(**{k: v for k, v in kwargs.items() if k != "app"})
    except TypeError as exc:
        raise InvalidJobInput(f"{job_name}: {exc}") from None


def enqueue(
    job_name: str,
    *,
    app: Celery | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    tags: Sequence[str] | None = None,
    **kwargs: Any,
) -> EnqueueResult:
    """Validate and send one job (summarize, classify, agent, chain, chord) to the broker.

    The trace attributes go into the message headers. A workflow is sent as a user would
    write it (`chord(...).apply_async()`): tracing puts a chord in one trace under a root
    observation of its own, derived from its group id; a chain's trace is its first link's.
    Raises `InvalidJobInput` for a bad job name or argument.
    """
    app = app or producer_app()
    with tracing.trace_attributes(user_id=user_id, session_id=session_id, tags=tuple(tags or ())):
        task_id, root_id = _send(job_name, app, kwargs)
    trace_id = tracing.trace_id_for(root_id)
    return EnqueueResult(task_id=task_id, trace_id=trace_id, url=trace_url(trace_id),
                         root_id=root_id)


def _send(job_name: str, app: Celery, kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """Send the job; (the id of its result's task, the id its trace id derives from)."""
    if job_name in TASK_JOBS:
        task_name, validate = TASK_JOBS[job_name]
        _bind(job_name, validate, kwargs)
        task_id = str(app.send_task(task_name, kwargs=validate(**kwargs)).id)
        return task_id, task_id
    if job_name in CANVAS_JOBS:
        build = CANVAS_JOBS[job_name]
        _bind(job_name, build, kwargs)
        result = build(**kwargs, app=app).apply_async()
        if isinstance(result.parent, GroupResult):
            return str(result.id), str(result.parent.id)  # a chord: its callback, its group
        first = result
        while first.parent is not None:  # a chain: its first link
            first = first.parent
        return str(result.id), str(first.id)
    raise InvalidJobInput(f"unknown job {job_name!r}: expected one of {', '.join(JOB_NAMES)}")


def trace_url(trace_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """`{LANGFUSE_BASE_URL}/trace/{trace_id}` (Langfuse redirects it), or None if unset."""
    env = os.environ if env is None else env
    base = env.get("LANGFUSE_BASE_URL") or env.get("LANGFUSE_HOST")
    return f"{base.rstrip('/')}/trace/{trace_id}" if base else None


# ---- click CLI -------------------------------------------------------------------------


@click.group()
def main() -> None:
    """Send LLM jobs to the Celery workers and score their traces in Langfuse."""


@main.group("enqueue")
def enqueue_group() -> None:
    """Send one job; prints its task id, Langfuse trace id and trace URL."""


def _producer_options(fn: F) -> F:
    options = [
        click.option("--user-id", help="Langfuse user id of the trace."),
        click.option("--session-id", help="Langfuse session id of the trace."),
        click.option("--tag", "tags", multiple=True, help="Trace tag (repeatable)."),
        click.option("--wait", is_flag=True, help="Wait for the result and print it."),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=60.0,
            show_default=True,
            help="Seconds --wait waits.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@enqueue_group.command("summarize")
@click.option("--text", required=True, help="Text to summarize.")
@click.option("--max-sentences", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option(
    "--simulate-rate-limits",
    type=click.IntRange(0, 10),
    default=0,
    help="Local provider only: the first N attempts get a rate-limit error, to show retries.",
)
@_producer_options
def enqueue_summarize(
    text: str, max_sentences: int, simulate_rate_limits: int, **options: Any
) -> None:
    """Summarize a text."""
    _submit(
        "summarize",
        options,
        text=text,
        max_sentences=max_sentences,
        simulate_rate_limits=simulate_rate_limits,
    )


@enqueue_group.command("classify")
@click.option("--text", required=True, help="Text to classify.")
@click.option("--label", "labels", multiple=True, required=True, help="Label (repeat, 2+).")
@_producer_options
def enqueue_classify(text: str, labels: tuple[str, ...], **options: Any) -> None:
    """Classify a text into one of the given labels."""
    _submit("classify", options, text=text, labels=list(labels))


@enqueue_group.command("agent")
@click.option("--question", required=True, help="Question for the research agent.")
@click.option("--max-steps", type=click.IntRange(1, 10), default=4, show_default=True)
@_producer_options
def enqueue_agent(question: str, max_steps: int, **options: Any) -> None:
    """Run the research agent (tools: calculator, keyword_search, word_count)."""
    _submit("agent", options, question=question, max_steps=max_steps)


@enqueue_group.command("chord")
@click.option("--text", "texts", multiple=True, required=True, help="Text (repeatable).")
@click.option("--max-sentences", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--combined-sentences", type=click.IntRange(1, 20), default=5, show_default=True)
@_producer_options
def enqueue_chord(
    texts: tuple[str, ...], max_sentences: int, combined_sentences: int, **options: Any
) -> None:
    """Summarize several texts in parallel, then combine the summaries."""
    _submit(
        "chord",
        options,
        texts=list(texts),
        max_sentences=max_sentences,
        combined_sentences=combined_sentences,
    )


@enqueue_group.command("chain")
@click.option("--text", required=True, help="Text to classify, then summarize.")
@click.option("--label", "labels", multiple=True, required=True, help="Label (repeat, 2+).")
@click.option("--max-sentences", type=click.IntRange(1, 20), default=3, show_default=True)
@_producer_options
def enqueue_chain(text: str, labels: tuple[str, ...], max_sentences: int, **options: Any) -> None:
    """Classify a text, then summarize it knowing its label."""
    _submit("chain", options, text=text, labels=list(labels), max_sentences=max_sentences)


def _submit(job_name: str, options: Mapping[str, Any], **kwargs: Any) -> None:
    app = producer_app()
    broker = maybe_sanitize_url(app.conf.broker_url)
    try:
        sent = enqueue(
            job_name,
            app=app,
            user_id=options["user_id"],
            session_id=options["session_id"],
            tags=options["tags"],
            **kwargs,
        )
    except InvalidJobInput as exc:
        raise click.UsageError(str(exc)) from None
    except (OperationalError, OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())  # Celery's messages span several lines
        raise click.ClickException(f"could not send the job via {broker}: {reason}") from None
    output: dict[str, Any] = asdict(sent)
    if options["wait"]:
        output["result"] = _wait(app, sent.task_id, options["timeout"])
    _print(output, options["as_json"])


def _wait(app: Celery, task_id: str, timeout: float) -> Any:
    try:
        return app.AsyncResult(task_id).get(timeout=timeout, disable_sync_subtasks=False)
    except CeleryTimeoutError:
        raise click.ClickException(
            f"no result for task {task_id} within {timeout:g}s (it may still be queued or running)"
        ) from None
    except Exception as exc:  # the task's own exception, re-raised by the result backend
        raise click.ClickException(f"task {task_id} failed: {type(exc).__name__}: {exc}") from None


def _print(output: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(output, default=str))
        return
    for key, value in output.items():
        if value is None:
            continue
        if not isinstance(value, str):
            value = json.dumps(value, indent=2, default=str)
        click.echo(f"{key}: {value}")


@main.command("score")
@click.argument("task_id")
@click.argument("name")
@click.argument("value")
@click.option("--comment", help="Free-text comment on the score.")
@click.option("--root-id", help="Root task id, when TASK_ID is not the root of its workflow.")
def score(task_id: str, name: str, value: str, comment: str | None, root_id: str | None) -> None:
    """Attach a score (number, or text for a categorical score) to a task's observation."""
    parsed = parse_score_value(value)
    # score_task writes the score to the spool (no network); at exit this process makes one
    # bounded attempt to ship it, then hands what is left to a worker
    # (see tracing.instrumentation._scores).
    trace_id = tracing.score_task(task_id, name, parsed, comment=comment, root_id=root_id)
    click.echo(f"scored {name}={parsed!r} on task {task_id} (trace {trace_id})")


def parse_score_value(value: str) -> float | str:
    """A finite number if `value` is one ("0.8", "1"), else the text (categorical score)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value

"""The Celery app the integration tests run in real workers: one task per kind of end."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, chord, group
from celery.exceptions import Ignore, Reject
from langfuse import get_client, observe

import tracing

app = Celery(
    "traced_app",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:1/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:1/1"),
)
app.conf.update(
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)

if os.environ.get("TEST_VISIBILITY_TIMEOUT"):
    # Redis restores an unacked message (acks_late, worker killed) after this many seconds.
    # kombu sweeps for such messages every interval x throttle seconds (10 x 10 by default:
    # a message missed by a new worker's first sweep came back 100 s later), under a mutex
    # a killed worker may leave held for unacked_mutex_expire (300 s by default).
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 5}

if os.environ.get("TEST_CLIENT_BEFORE_INSTRUMENT"):
    # An application that created its Langfuse client at import time, before instrument().
    get_client()

tracing.instrument(app)

if os.environ.get("TEST_BREAK_TRACING"):
    # Inject failures into the tracing layer itself: every task's handlers hit them.
    import tracing.instrumentation._task_tracing as _task_tracing

    def _broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected tracing failure")

    _task_tracing.task_metadata = _broken  # type: ignore[assignment]
    _task_tracing._render = _broken  # type: ignore[assignment]


def _generation(name: str, text: str) -> str:
    with get_client().start_as_current_observation(
        as_type="generation", name=name, model="test-model", input=text,
    ) as generation:
        output = text.upper()
        generation.update(output=output, usage_details={"input": len(text), "output": 3})
    return output


@app.task(name="t.generate")
def generate(i: int) -> dict[str, Any]:
    return {"i": i, "text": _generation("llm", f"prompt {i}")}


@observe(name="helper-step")
def _observed_step(x: int) -> int:
    return x * 2


@app.task(name="t.observed")
def observed(x: int) -> int:
    return _observed_step(x)


@app.task(name="t.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="t.replaced", bind=True)
def replaced(self: Any, x: int) -> None:
    """Replaces itself with ``t.add(x, x)`` (``Task.replace``), as a dynamic chord member."""
    raise self.replace(add.s(x, x))


@app.task(name="t.replaced_by_group", bind=True)
def replaced_by_group(self: Any, x: int) -> None:
    """Replaces itself with a group of two ``t.add`` (Celery makes it a chord)."""
    raise self.replace(group(add.s(x, x), add.s(x, 1)))


@app.task(name="t.replaced_by_chord", bind=True)
def replaced_by_chord(self: Any, x: int) -> None:
    """Replaces itself with a chord of two ``t.add`` whose callback is ``t.echo``."""
    raise self.replace(chord([add.s(x, x), add.s(x, 1)], echo.s()))


@app.task(name="t.fail")
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@app.task(name="t.expected", throws=(KeyError,))
def expected() -> None:
    raise KeyError("missing")


@app.task(name="t.retry", bind=True, max_retries=1)
def retry(self: Any) -> str:
    if self.request.retries == 0:
        raise self.retry(exc=RuntimeError("flaky"), countdown=0.1)
    return "ok"


@app.task(name="t.headers", bind=True, max_retries=1)
def headers_seen(self: Any, first: Any = None) -> dict[str, Any]:
    """Retried once; returns the request.headers each attempt saw (Celery's own
    test_task_retried_headers, with the first attempt's headers kept too)."""
    seen = dict(self.request.headers or {})
    if self.request.retries == 0:
        raise self.retry(kwargs={"first": seen}, countdown=0.1)
    return {"first": first, "second": seen}


@app.task(name="t.redelivered", bind=True, acks_late=True, reject_on_worker_lost=True)
def redelivered(self: Any) -> str:
    """First delivery: a generation, then waits to be killed; the redelivered message
    (acks_late + reject_on_worker_lost) makes its own generation and returns."""
    if self.request.delivery_info.get("redelivered"):
        _generation("redelivered-run-llm", "again")
        return "redelivered run"
    _generation("killed-run-llm", "first")
    time.sleep(60)
    return "first run"


@app.task(name="t.requeue", bind=True, acks_late=True)
def requeue(self: Any) -> str:
    """Rejects its message with requeue on the first delivery; the redelivery succeeds."""
    if self.request.delivery_info.get("redelivered"):
        _generation("requeued-second-llm", "second")
        return "second"
    _generation("requeued-first-llm", "first")
    raise Reject("not now", requeue=True)


@app.task(name="t.ignore")
def ignore() -> None:
    raise Ignore()


@app.task(name="t.reject")
def reject() -> None:
    raise Reject("bad message", requeue=False)


@app.task(name="t.soft", soft_time_limit=0.3)
def soft() -> None:
    time.sleep(5)


@app.task(name="t.hard", time_limit=2)
def hard(i: int = 0) -> None:
    _generation("before-the-kill", f"hard {i}")
    time.sleep(30)


@app.task(name="t.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="t.secret")
def secret(api_key: str, payload: Any) -> dict[str, Any]:
    return {"password": api_key, "echo": payload}


@app.task(name="t.chain_step")
def chain_step(previous: Any, step: int) -> list[Any]:
    _generation(f"step-{step}", str(previous))
    return [previous, step]


@app.task(name="t.openai")
def openai_call(base_url: str) -> str:
    from langfuse.openai import OpenAI  # the SDK's OpenAI drop-in: its own instrumentation

    client = OpenAI(base_url=base_url, api_key="sk-fake", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi."}]
    )
    return str(reply.choices[0].message.content)


# -- hostile payloads and a failing result store (issue 11) -----------------------------------

from tests.apps.hostile import BadRepr, FailingStore  # noqa: E402


@app.task(name="t.echo")
def echo(value: Any = None, **kwargs: Any) -> Any:
    """Returns what it got, after a generation: hostile kwargs come back as the result."""
    _generation("echo-llm", "echo")
    return value


@app.task(name="t.hostile_result", ignore_result=True)
def hostile_result(kind: str) -> Any:
    """Returns a value that is hard to render; the result is not stored."""
    _generation("hostile-llm", kind)
    if kind == "surrogate":
        return "bad \udc80 text"
    if kind == "bad_repr_set":
        return {BadRepr(), BadRepr()}
    loop: list[Any] = []
    loop.append(loop)
    return loop


@app.task(name="t.store_fails", base=FailingStore)
def store_fails() -> str:
    """Succeeds; storing its result raises ConnectionError (a result store going away)."""
    _generation("store-llm", "store")
    return "done"


@app.task(name="t.many")
def many(n: int) -> int:
    """``n`` generations without ever yielding to another greenlet (the gevent/eventlet row)."""
    client = get_client()
    for i in range(n):
        client.start_observation(as_type="generation", name="bulk", input=str(i)).end()
    return n


@app.task(name="t.prompted")
def prompted(topic: str) -> str:
    """A generation linked to a Langfuse prompt (a prompt client made offline)."""
    from langfuse.api import Prompt_Text
    from langfuse.model import TextPromptClient

    prompt = TextPromptClient(Prompt_Text(
        name="summarize-topic", version=3, prompt="Summarize {{topic}}", config={},
        labels=["production"], tags=[], type="text"))
    with get_client().start_as_current_observation(
        as_type="generation", name="prompted-llm", model="m", prompt=prompt,
        input=prompt.compile(topic=topic),
    ) as generation:
        generation.update(output="ok")
    return "ok"


@app.task(name="t.versioned")
@tracing.task_options(version="v7", environment="staging", join="link")
def versioned() -> str:
    """A task whose options set version, environment and a `link` join."""
    return "ok"


if os.environ.get("TEST_BEAT_EVERY"):
    app.conf.beat_schedule = {
        "add-every-tick": {"task": "t.add", "schedule": float(os.environ["TEST_BEAT_EVERY"]),
                           "args": (1, 1)},
    }

"""Unit tests of what the demo's retrying job relies on: simulated rate limits, Retry-After."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from celery import Celery
from celery.app.task import Task
from celery.signals import before_task_publish
from click.testing import CliRunner
from opentelemetry.sdk.trace import ReadableSpan

import tasks.cli
import tasks.jobs
from tasks import InvalidJobInput, RetryableLLMError, summarize
from tasks.jobs import RETRY_BACKOFF_MAX
from tasks.llm import LLMClient, LocalProvider, Message, ProviderReply, SimulatedRateLimit
from tests.capture import Captured

Generations = Callable[[], list[ReadableSpan]]
TEXT = "The invoice shows a duplicate charge. Please refund the second payment to my card."


@pytest.fixture
def generations(
    captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], list[ReadableSpan]]:
    """The jobs' local model recording into a real Langfuse client; yields its generations."""
    client = LLMClient(
        LocalProvider(latency_ms=0), default_model="local-extractive-1",
        langfuse=captured.langfuse,
    )
    monkeypatch.setattr(tasks.jobs, "get_llm_client", lambda: client)
    return lambda: captured.spans("generation")


class _OtherProvider:
    """A provider that is not the local model."""

    name = "openai"

    def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        stream: bool = False,
    ) -> ProviderReply:
        """Answer anything with a fixed text."""
        return ProviderReply("ok", 1, 1, model)


def test_simulated_rate_limit_fails_like_a_429_with_retry_after() -> None:
    """The stand-in provider raises a retryable 429 carrying its Retry-After delay."""
    with pytest.raises(RetryableLLMError) as info:
        SimulatedRateLimit(retry_after=0.5).complete(
            [{"role": "user", "content": "hi"}], model="m", temperature=0, max_tokens=5
        )
    assert info.value.status_code == 429 and info.value.retry_after == 0.5
    assert "429" in str(info.value)


def test_summarize_is_rate_limited_for_the_first_attempts_then_succeeds(
    generations: Generations,
) -> None:
    """With simulate_rate_limits=2 the first two attempts fail (ERROR generations), the third
    succeeds."""
    result = summarize.apply(kwargs={"text": TEXT, "simulate_rate_limits": 2})
    assert result.successful(), result.traceback
    assert result.result["summary"]
    levels = [
        (g.attributes or {}).get("langfuse.observation.level", "DEFAULT") for g in generations()
    ]
    assert levels == ["ERROR", "ERROR", "DEFAULT"]
    [first, *_] = generations()
    assert "429" in str((first.attributes or {}).get("langfuse.observation.status_message"))


def test_summarize_without_the_option_is_not_rate_limited(
    generations: Generations,
) -> None:
    """The default (0) leaves the job untouched: one attempt, one successful generation."""
    assert summarize.apply(kwargs={"text": TEXT}).successful()
    assert len(generations()) == 1


def test_attempts_past_the_limit_use_the_real_local_model(
    generations: Generations,
) -> None:
    """An attempt whose retry count has reached N is not rate-limited."""
    result = summarize.apply(kwargs={"text": TEXT, "simulate_rate_limits": 1}, retries=1)
    assert result.successful(), result.traceback
    assert len(generations()) == 1


@pytest.mark.parametrize("value", [-1, 11, "2", True])
def test_simulate_rate_limits_is_validated(generations: Generations, value: Any) -> None:
    """A bad simulate_rate_limits value is an InvalidJobInput naming it."""
    with pytest.raises(InvalidJobInput, match=r"^simulate_rate_limits"):
        summarize(TEXT, simulate_rate_limits=value)


def test_simulated_rate_limits_need_the_local_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors are never faked in front of a real model: other providers refuse the option."""
    client = LLMClient(_OtherProvider(), default_model="gpt")
    monkeypatch.setattr(tasks.jobs, "get_llm_client", lambda: client)
    with pytest.raises(InvalidJobInput, match="local provider"):
        summarize(TEXT, simulate_rate_limits=1)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(0.5, 0.5), (None, 7), (3600.0, RETRY_BACKOFF_MAX), (-1.0, 0.0)],
)
def test_retry_waits_what_the_server_asked(
    monkeypatch: pytest.MonkeyPatch, retry_after: float | None, expected: float
) -> None:
    """A RetryableLLMError's Retry-After (capped) replaces the backoff countdown."""
    seen: dict[str, Any] = {}

    def fake_retry(self: Task, *args: Any) -> None:
        seen["countdown"] = args[5]

    monkeypatch.setattr(Task, "retry", fake_retry)
    exc = RetryableLLMError("429", status_code=429, retry_after=retry_after)
    summarize.retry(exc=exc, countdown=7)
    assert seen["countdown"] == expected


def test_retry_keeps_the_backoff_for_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors without Retry-After keep Celery's countdown."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(Task, "retry", lambda self, *args: seen.update(countdown=args[5]))
    summarize.retry(exc=ValueError("x"), countdown=3)
    assert seen["countdown"] == 3


@pytest.fixture
def sent_bodies() -> Iterator[list[Any]]:
    """Bodies of every message published while the test runs."""
    bodies: list[Any] = []

    def record(body: Any = None, **_: Any) -> None:
        bodies.append(body)

    before_task_publish.connect(record, weak=False)
    yield bodies
    before_task_publish.disconnect(record)


@pytest.mark.parametrize(("args", "expected"), [([], None), (["--simulate-rate-limits", "2"], 2)])
def test_cli_sends_simulate_rate_limits_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, sent_bodies: list[Any], args: list[str], expected: Any
) -> None:
    """`enqueue summarize --simulate-rate-limits N` passes the kwarg; without it, nothing."""
    app = Celery("test-producer", broker="memory://", backend="cache+memory://")
    monkeypatch.setattr(tasks.cli, "producer_app", lambda: app)
    command = ["enqueue", "summarize", "--text", TEXT, "--json", *args]
    result = CliRunner().invoke(tasks.cli.main, command)
    app.close()
    assert result.exit_code == 0, result.output
    [(_, kwargs, _)] = sent_bodies
    assert kwargs.get("simulate_rate_limits") == expected

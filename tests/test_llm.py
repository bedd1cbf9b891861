"""Unit tests of the LLM client: local model, pricing, env validation, OpenAI provider, tracing."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from tasks.llm import (
    LLMClient,
    LLMConfigError,
    LLMError,
    LLMSettings,
    LocalProvider,
    Message,
    OpenAIProvider,
    PriceTable,
    RetryableLLMError,
    Usage,
    count_message_tokens,
    count_tokens,
)
from tasks.llm._local import classify, summarize
from tests.capture import Captured
from tests.fake_openai import FakeOpenAI, Reply, completion

TEXT = (
    "Celery workers execute tasks from a Redis queue. "
    "The weather was pleasant on Tuesday. "
    "Each Celery task sends spans to Langfuse, and Langfuse shows every task as a trace. "
    "Lunch was served at noon. "
    "Tracing Celery tasks in Langfuse helps find slow tasks."
)
MESSAGES = [
    Message(role="system", content="Summarize the user's text in at most 2 sentences."),
    Message(role="user", content=TEXT),
]


# ---- fixtures -----------------------------------------------------------------------------




@pytest.fixture
def local_llm(captured: Captured) -> LLMClient:
    """An LLMClient on the local model, no latency, recording into `captured`."""
    return LLMClient(
        LocalProvider(latency_ms=0), default_model="local-extractive-1", langfuse=captured.langfuse
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# ---- local model --------------------------------------------------------------------------


def test_local_summary_is_deterministic_and_extractive(local_llm: LLMClient) -> None:
    """The local model returns the same summary every time, made of the text's own sentences."""
    first = local_llm.chat(MESSAGES)
    second = local_llm.chat(MESSAGES)
    assert first.text == second.text
    assert first.usage == second.usage
    sentences = [s for s in first.text.split(". ") if s]
    assert len(sentences) == 2
    assert all(s.rstrip(".") in TEXT for s in sentences)


def test_local_summary_keeps_frequent_topic_sentences() -> None:
    """Sentences rich in the text's frequent words win over off-topic ones, kept in text order."""
    summary = summarize(TEXT, 2)
    assert "weather" not in summary and "Lunch" not in summary
    assert summary.index("Each Celery task") < summary.index("Tracing Celery")


def test_local_summary_of_short_text_is_the_text() -> None:
    """A text with fewer sentences than asked for comes back whole."""
    assert summarize("One sentence only.", 3) == "One sentence only."


def test_token_counts_follow_the_word_punctuation_tokenizer(local_llm: LLMClient) -> None:
    """Usage counts words and punctuation, with per-message framing on the prompt side."""
    assert count_tokens("Hello, world!") == 4
    assert count_message_tokens([Message(role="user", content="Hello, world!")]) == 4 + 4 + 3
    result = local_llm.chat(MESSAGES)
    assert result.usage == Usage(
        input=count_message_tokens(MESSAGES),
        output=count_tokens(result.text),
        total=count_message_tokens(MESSAGES) + count_tokens(result.text),
    )
    assert result.usage["input"] > len(TEXT.split())  # realistic, not a token per message


def test_local_max_tokens_cuts_the_output(local_llm: LLMClient) -> None:
    """max_tokens bounds the output like a real model's length limit."""
    result = local_llm.chat(MESSAGES, max_tokens=5)
    assert result.usage["output"] == 5
    assert result.text in TEXT


def test_local_classifier_uses_label_keywords() -> None:
    """The keyword classifier picks the label whose keywords occur, and a catch-all otherwise."""
    labels = ["billing", "technical", "other"]
    assert classify("I was charged twice, please refund the payment.", labels) == "billing"
    assert classify("The app crashes with an error on login.", labels) == "technical"
    assert classify("Nice to meet you.", labels) == "other"
    assert classify("Nice to meet you.", ["sports", "politics"]) == "sports"


def test_local_latency_is_applied() -> None:
    """LLM_LOCAL_LATENCY_MS delays each call by about that much."""
    provider = LocalProvider(latency_ms=40)
    started = time.monotonic()
    provider.complete(MESSAGES, model="local-extractive-1", temperature=0.0, max_tokens=50)
    assert time.monotonic() - started >= 0.04


# ---- prices and settings ------------------------------------------------------------------


def test_cost_uses_the_price_table() -> None:
    """Cost is tokens times the model's USD price per million, dated snapshots included."""
    usage = Usage(input=1_000_000, output=500_000, total=1_500_000)
    cost = PriceTable().cost("gpt-4o-mini-2024-07-18", usage)
    assert cost == pytest.approx({"input": 0.15, "output": 0.30, "total": 0.45})
    assert PriceTable().cost("some-unknown-model", usage) is None


def test_prices_json_overrides_and_adds_models(local_llm: LLMClient) -> None:
    """LLM_PRICES_JSON replaces built-in prices and prices models the table lacks."""
    raw = json.dumps(
        {"local-extractive-1": {"input": 1.0, "output": 2.0}, "mine": {"input": 3, "output": 4}}
    )
    settings = LLMSettings.from_env({"LLM_PRICES_JSON": raw, "LLM_LOCAL_LATENCY_MS": "0"})
    client = LLMClient.from_settings(settings, langfuse=local_llm.langfuse)
    result = client.chat(MESSAGES)
    assert result.cost is not None
    assert result.cost["input"] == pytest.approx(result.usage["input"] * 1.0 / 1e6)
    assert result.cost["output"] == pytest.approx(result.usage["output"] * 2.0 / 1e6)
    assert client.prices.prices_for("mine") == {"input": 3.0, "output": 4.0}


@pytest.mark.parametrize(
    "raw",
    ["not json", "[1, 2]", '{"m": {"input": 1}}', '{"m": {"input": -1, "output": 1}}'],
)
def test_bad_prices_json_names_the_variable(raw: str) -> None:
    """A malformed LLM_PRICES_JSON is refused with an error naming the variable."""
    with pytest.raises(LLMConfigError, match="LLM_PRICES_JSON"):
        LLMSettings.from_env({"LLM_PRICES_JSON": raw})


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LLM_PROVIDER": "bogus"}, "LLM_PROVIDER"),
        ({"LLM_TIMEOUT": "soon"}, "LLM_TIMEOUT"),
        ({"LLM_TIMEOUT": "0"}, "LLM_TIMEOUT"),
        ({"LLM_LOCAL_LATENCY_MS": "-1"}, "LLM_LOCAL_LATENCY_MS"),
        ({"LLM_STREAM": "maybe"}, "LLM_STREAM"),
        ({"LLM_PROVIDER": "openai"}, "LLM_API_KEY"),
    ],
)
def test_bad_env_names_the_variable(env: dict[str, str], variable: str) -> None:
    """Each unusable LLM_* value raises LLMConfigError naming the variable and the value."""
    with pytest.raises(LLMConfigError, match=variable) as info:
        LLMClient.from_env(env)
    assert "expected" in str(info.value) or "set LLM_API_KEY" in str(info.value)


def test_default_env_is_the_local_provider() -> None:
    """With no LLM_* variables the client runs the offline model."""
    client = LLMClient.from_env({})
    assert isinstance(client.provider, LocalProvider)
    assert client.default_model == "local-extractive-1"


def test_openai_settings_need_no_key_for_a_custom_server() -> None:
    """A self-hosted OpenAI-compatible server may run without LLM_API_KEY."""
    env = {"LLM_PROVIDER": "openai", "LLM_BASE_URL": "http://127.0.0.1:8000/v1/"}
    settings = LLMSettings.from_env(env)
    assert settings.base_url == "http://127.0.0.1:8000/v1"
    assert settings.model == "gpt-4o-mini"
    assert isinstance(LLMClient.from_settings(settings).provider, OpenAIProvider)


# ---- OpenAI-compatible provider -----------------------------------------------------------


def test_openai_happy_path_parses_text_usage_and_model(
    fake_openai: FakeOpenAI, captured: Captured
) -> None:
    """A 200 reply yields its text, the server's token usage, the served model and its cost."""
    client = LLMClient(
        fake_openai.provider(), default_model="gpt-4o-mini", langfuse=captured.langfuse
    )
    result = client.chat(MESSAGES, temperature=0.2, max_tokens=64)
    assert result.text == "Hi there."
    assert result.usage == {"input": 11, "output": 3, "total": 14}
    assert result.model == "gpt-4o-mini-2024-07-18"
    assert result.cost is not None and result.cost["total"] == pytest.approx(
        (11 * 0.15 + 3 * 0.60) / 1e6
    )
    request = fake_openai.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-fake"
    assert request["model"] == "gpt-4o-mini"
    assert request["messages"] == MESSAGES
    assert (request["temperature"], request["max_tokens"]) == (0.2, 64)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_openai_transient_status_is_retryable(fake_openai: FakeOpenAI, status: int) -> None:
    """429 and 5xx raise RetryableLLMError carrying the status and Retry-After."""
    error = {"error": {"message": "slow down", "type": "rate_limit"}}
    fake_openai.replies.append(Reply(status=status, body=error, headers={"Retry-After": "7"}))
    provider = fake_openai.provider()
    with pytest.raises(RetryableLLMError, match="slow down") as info:
        provider.complete(MESSAGES, model="m", temperature=0.0, max_tokens=10)
    assert info.value.status_code == status
    assert info.value.retry_after == 7.0


def test_openai_client_error_is_not_retryable(fake_openai: FakeOpenAI) -> None:
    """A 400 raises a plain LLMError with the server's message, so the task is not retried."""
    error = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}
    fake_openai.replies.append(Reply(status=400, body=error))
    with pytest.raises(LLMError, match="max_tokens is too large") as info:
        fake_openai.provider().complete(MESSAGES, model="m", temperature=0.0, max_tokens=10)
    assert not isinstance(info.value, RetryableLLMError)
    assert info.value.status_code == 400


def test_openai_connection_refused_is_retryable() -> None:
    """A refused connection is a network error, hence retryable."""
    provider = OpenAIProvider(
        base_url=f"http://127.0.0.1:{_closed_port()}/v1", api_key=None, timeout=2.0
    )
    with pytest.raises(RetryableLLMError, match="network error"):
        provider.complete(MESSAGES, model="m", temperature=0.0, max_tokens=10)


def test_openai_timeout_is_retryable(fake_openai: FakeOpenAI) -> None:
    """A reply slower than LLM_TIMEOUT raises RetryableLLMError."""
    fake_openai.replies.append(Reply(body=completion(), delay=1.0))
    with pytest.raises(RetryableLLMError, match="timeout"):
        fake_openai.provider(timeout=0.2).complete(
            MESSAGES, model="m", temperature=0.0, max_tokens=10
        )


def test_openai_malformed_reply_is_not_retryable(fake_openai: FakeOpenAI) -> None:
    """A 200 without choices is an LLMError naming the problem."""
    fake_openai.replies.append(Reply(body={"unexpected": True}))
    with pytest.raises(LLMError, match="malformed"):
        fake_openai.provider().complete(MESSAGES, model="m", temperature=0.0, max_tokens=10)


def test_openai_streaming_records_time_to_first_token(
    fake_openai: FakeOpenAI, captured: Captured
) -> None:
    """With stream=True the text is assembled from deltas and usage comes from the last chunk."""
    chunks = [
        {"model": "gpt-4o-mini", "choices": [{"delta": {"role": "assistant"}}]},
        {"model": "gpt-4o-mini", "choices": [{"delta": {"content": "Hello"}}]},
        {"model": "gpt-4o-mini", "choices": [{"delta": {"content": " world."}}]},
        {
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2},
        },
    ]
    fake_openai.replies.append(Reply(sse=chunks))
    client = LLMClient(
        fake_openai.provider(), default_model="gpt-4o-mini", langfuse=captured.langfuse
    )
    result = client.chat(MESSAGES, stream=True)
    assert result.text == "Hello world."
    assert result.usage == {"input": 9, "output": 2, "total": 11}
    assert result.completion_start_time is not None
    assert fake_openai.requests[0]["stream"] is True
    (span,) = captured.only("generation")
    assert "langfuse.observation.completion_start_time" in _attrs(span)


# ---- generations in Langfuse --------------------------------------------------------------


def test_each_call_is_a_generation_with_model_usage_and_cost(
    local_llm: LLMClient, captured: Captured
) -> None:
    """A chat call exports one generation span with model, parameters, usage, cost and I/O."""
    result = local_llm.chat(MESSAGES, name="summarize", temperature=0.0, max_tokens=100)
    (span,) = captured.only("generation")
    attrs = _attrs(span)
    assert span.name == "summarize"
    assert attrs["langfuse.observation.model.name"] == "local-extractive-1"
    assert json.loads(attrs["langfuse.observation.model.parameters"]) == {
        "temperature": 0.0,
        "max_tokens": 100,
    }
    assert json.loads(attrs["langfuse.observation.usage_details"]) == result.usage
    cost = json.loads(attrs["langfuse.observation.cost_details"])
    assert cost == pytest.approx(dict(result.cost or {}))
    assert json.loads(attrs["langfuse.observation.input"]) == MESSAGES
    assert json.loads(attrs["langfuse.observation.output"])["content"] == result.text
    assert "langfuse.observation.completion_start_time" in attrs
    assert "langfuse.observation.level" not in attrs


def test_failed_call_is_an_error_generation_and_reraises(
    fake_openai: FakeOpenAI, captured: Captured
) -> None:
    """A failing call records level ERROR with the error as status message, then re-raises."""
    fake_openai.replies.append(Reply(status=500, body={"error": {"message": "boom"}}))
    client = LLMClient(
        fake_openai.provider(), default_model="gpt-4o-mini", langfuse=captured.langfuse
    )
    with pytest.raises(RetryableLLMError):
        client.chat(MESSAGES, name="summarize")
    (span,) = captured.only("generation")
    attrs = _attrs(span)
    assert attrs["langfuse.observation.level"] == "ERROR"
    assert attrs["langfuse.observation.status_message"].startswith("RetryableLLMError: HTTP 500")
    assert "boom" in attrs["langfuse.observation.status_message"]
    assert "langfuse.observation.usage_details" not in attrs


def test_generation_nests_under_the_current_observation(
    local_llm: LLMClient, captured: Captured
) -> None:
    """Inside an observation (as inside a traced task) the generation is its child."""
    with captured.langfuse.start_as_current_observation(name="tasks.summarize", as_type="span"):
        local_llm.chat(MESSAGES)
    (parent,) = captured.only("span")
    (generation,) = captured.only("generation")
    assert generation.parent is not None and parent.context is not None
    assert generation.parent.span_id == parent.context.span_id
    assert generation.context is not None
    assert generation.context.trace_id == parent.context.trace_id


def test_invalid_messages_are_refused_before_any_call(local_llm: LLMClient) -> None:
    """Empty messages, unknown roles and non-string content raise ValueError."""
    with pytest.raises(ValueError, match="empty"):
        local_llm.chat([])
    with pytest.raises(ValueError, match="role"):
        local_llm.chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        local_llm.chat([{"role": "user", "content": 3}])  # type: ignore[typeddict-item]

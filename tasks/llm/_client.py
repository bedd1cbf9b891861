"""`LLMClient`: one chat interface over the providers, recording each call as a generation."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from ._errors import LLMError
from ._local import LocalProvider
from ._openai import OpenAIProvider
from ._prices import PriceTable
from ._settings import LLMSettings
from ._types import ChatResult, Cost, Message, ProviderReply, Usage

if TYPE_CHECKING:
    from langfuse import Langfuse

_ROLES = frozenset({"system", "user", "assistant", "tool"})


class Provider(Protocol):
    """What a model backend implements: one blocking chat call."""

    name: str

    def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        stream: bool = False,
    ) -> ProviderReply:
        """Answer `messages`; raise `LLMError` / `RetryableLLMError` on failure."""
        ...


class LLMClient:
    """Chat with the configured model; every call is a Langfuse generation.

    The generation nests under the current observation (inside a traced Celery task, the
    task's). `langfuse` defaults to `langfuse.get_client()`, looked up at each call so the
    client the tracing layer set up in the worker process is the one used.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        default_model: str,
        prices: PriceTable | None = None,
        stream: bool = False,
        langfuse: Langfuse | None = None,
    ) -> None:
        self.provider = provider
        self.default_model = default_model
        self.prices = prices or PriceTable()
        self.stream = stream
        self._langfuse = langfuse

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, langfuse: Langfuse | None = None
    ) -> LLMClient:
        """A client configured from LLM_* variables (see `LLMSettings.from_env`)."""
        settings = LLMSettings.from_env(os.environ if env is None else env)
        return cls.from_settings(settings, langfuse=langfuse)

    @classmethod
    def from_settings(cls, settings: LLMSettings, *, langfuse: Langfuse | None = None) -> LLMClient:
        """A client for already validated settings."""
        provider: Provider
        if settings.provider == "openai":
            provider = OpenAIProvider(
                base_url=settings.base_url, api_key=settings.api_key, timeout=settings.timeout
            )
        else:
            provider = LocalProvider(latency_ms=settings.local_latency_ms)
        return cls(
            provider,
            default_model=settings.model,
            prices=PriceTable(settings.price_overrides),
            stream=settings.stream,
            langfuse=langfuse,
        )

    @property
    def langfuse(self) -> Langfuse:
        """The Langfuse client generations are recorded with."""
        if self._langfuse is not None:
            return self._langfuse
        from langfuse import get_client

        return get_client()

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        name: str = "chat",
        stream: bool | None = None,
    ) -> ChatResult:
        """Send `messages` to the model; return its text, token usage, model and cost.

        Raises `RetryableLLMError` for transient failures, `LLMError` for the rest; either
        way the generation is recorded with level ERROR and the error as status message.
        """
        _check_messages(messages)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        model = model or self.default_model
        parameters: dict[str, str | int | float | bool | list[str] | None] = {
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        with self.langfuse.start_as_current_observation(
            as_type="generation",
            name=name,
            model=model,
            model_parameters=parameters,
            input=list(messages),
        ) as generation:
            try:
                reply = self.provider.complete(
                    messages,
                    model=model,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    stream=self.stream if stream is None else stream,
                )
            except Exception as exc:
                generation.update(level="ERROR", status_message=f"{type(exc).__name__}: {exc}")
                raise
            result = self._result(reply)
            generation.update(
                output={"role": "assistant", "content": result.text},
                model=result.model,
                usage_details=_usage_details(result.usage),
                cost_details=_cost_details(result.cost),
                completion_start_time=result.completion_start_time,
            )
        return result

    def _result(self, reply: ProviderReply) -> ChatResult:
        usage = Usage(
            input=reply.input_tokens,
            output=reply.output_tokens,
            total=reply.input_tokens + reply.output_tokens,
        )
        return ChatResult(
            text=reply.text,
            usage=usage,
            model=reply.model,
            cost=self.prices.cost(reply.model, usage),
            completion_start_time=reply.completion_start_time,
        )


def _usage_details(usage: Usage) -> dict[str, int]:
    return {"input": usage["input"], "output": usage["output"], "total": usage["total"]}


def _cost_details(cost: Cost | None) -> dict[str, float] | None:
    if cost is None:
        return None
    return {"input": cost["input"], "output": cost["output"], "total": cost["total"]}


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            raise ValueError(f"messages[{index}] needs a role among {sorted(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")


@functools.lru_cache(maxsize=1)
def get_llm_client() -> LLMClient:
    """The process-wide client configured from the environment (read once, on first use)."""
    return LLMClient.from_env()


__all__ = ["LLMClient", "LLMError", "Provider", "get_llm_client"]

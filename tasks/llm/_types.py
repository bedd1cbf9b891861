"""Value types shared by the LLM client and its providers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict


class Message(TypedDict):
    """One chat message, in the OpenAI chat-completions shape."""

    role: str
    content: str


class Usage(TypedDict):
    """Token counts, keyed the way Langfuse's `usage_details` expects."""

    input: int
    output: int
    total: int


class Cost(TypedDict):
    """Cost in USD, keyed the way Langfuse's `cost_details` expects."""

    input: float
    output: float
    total: float


@dataclass(frozen=True)
class ProviderReply:
    """What a provider returns for one chat call, before pricing."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str
    # When the first output token arrived (time to first token), if the provider knows it.
    completion_start_time: datetime | None = None


@dataclass(frozen=True)
class ChatResult:
    """The outcome of `LLMClient.chat`: text, token usage, model and cost."""

    text: str
    usage: Usage
    model: str
    # None when the model is not in the price table (Langfuse may still infer a cost).
    cost: Cost | None
    completion_start_time: datetime | None = None

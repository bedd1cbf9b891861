"""LLM client for the jobs: one chat interface, two providers chosen by LLM_PROVIDER.

- `local` (default): an offline deterministic model, no network or key needed.
- `openai`: any OpenAI-compatible chat-completions endpoint (LLM_BASE_URL, LLM_API_KEY).

Every call is recorded as a Langfuse generation (model, usage, cost, time to first token).
Environment: LLM_PROVIDER, LLM_MODEL, LLM_BASE_URL, LLM_API_KEY (or OPENAI_API_KEY),
LLM_TIMEOUT, LLM_STREAM, LLM_LOCAL_LATENCY_MS, LLM_PRICES_JSON.
"""

from ._client import LLMClient, Provider, get_llm_client
from ._errors import LLMConfigError, LLMError, RetryableLLMError
from ._local import LocalProvider, SimulatedRateLimit
from ._openai import OpenAIProvider
from ._prices import DEFAULT_PRICES, PriceTable
from ._settings import LLMSettings
from ._tokens import count_message_tokens, count_tokens
from ._types import ChatResult, Cost, Message, ProviderReply, Usage

__all__ = [
    "DEFAULT_PRICES",
    "ChatResult",
    "Cost",
    "LLMClient",
    "LLMConfigError",
    "LLMError",
    "LLMSettings",
    "LocalProvider",
    "Message",
    "OpenAIProvider",
    "PriceTable",
    "Provider",
    "ProviderReply",
    "RetryableLLMError",
    "SimulatedRateLimit",
    "Usage",
    "count_message_tokens",
    "count_tokens",
    "get_llm_client",
]

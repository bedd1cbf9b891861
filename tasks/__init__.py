"""LLM jobs for the Celery workers: summarize, classify, a research agent, and workflows.

Importing the package registers the tasks (`celery.shared_task`), so the worker's
`autodiscover_tasks(["tasks"])` finds them. Producers can send them by name without
importing this package (see `tasks.cli.enqueue` and `tasks.workflows`).
"""

from .cli import EnqueueResult, enqueue
from .jobs import (
    classify,
    combine_summaries,
    research_agent,
    run_agent,
    summarize,
    summarize_labeled,
)
from .llm import ChatResult, LLMClient, LLMConfigError, LLMError, RetryableLLMError, get_llm_client
from .validation import InvalidJobInput
from .workflows import classify_then_summarize, summarize_many

__all__ = [
    "ChatResult",
    "EnqueueResult",
    "InvalidJobInput",
    "LLMClient",
    "LLMConfigError",
    "LLMError",
    "RetryableLLMError",
    "classify",
    "classify_then_summarize",
    "combine_summaries",
    "enqueue",
    "get_llm_client",
    "research_agent",
    "run_agent",
    "summarize",
    "summarize_labeled",
    "summarize_many",
]

"""The LLM jobs, as Celery tasks: summarize, classify, a research agent, and chord/chain steps.

Every job takes plain JSON arguments and returns a JSON-serialisable dict. Bad arguments
raise `InvalidJobInput` (the task fails once, with the reason; never retried). Transient model
errors raise `RetryableLLMError`, which Celery retries with exponential backoff; each attempt
is its own observation in the same trace (the tracing layer does that).

Jobs also accept optional `user_id` / `session_id` keyword arguments, which become the
Langfuse trace's user and session. When the error carries the server's Retry-After, the
next attempt waits that long instead of the backoff (see `LLMJob`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Task, current_task, shared_task

from tracing import task_options

from . import prompts
from .llm import (
    ChatResult,
    LLMClient,
    Message,
    RetryableLLMError,
    SimulatedRateLimit,
    get_llm_client,
)
from .tools import TOOLS, ToolError, tool_specs
from .validation import (
    InvalidJobInput,
    int_arg,
    labels_arg,
    optional_id_arg,
    text_arg,
)

if TYPE_CHECKING:
    from langfuse import Langfuse

RETRY_BACKOFF_MAX = 60
# Retry only transient model errors; backoff 1, 2, 4, 8 s (jittered, capped) then fail.
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (RetryableLLMError,),
    "retry_backoff": True,
    "retry_backoff_max": RETRY_BACKOFF_MAX,
    "retry_jitter": True,
    "max_retries": 4,
}
MAX_QUESTION_CHARS = 2_000
MAX_SIMULATED_RATE_LIMITS = 10


class LLMJob(Task):
    """Task base of the LLM jobs: honour a rate limit's Retry-After when the server sent one.

    Celery's autoretry computes the exponential backoff and calls `retry`; a server that said
    how long to wait knows better, so its delay (capped at RETRY_BACKOFF_MAX) replaces it.
    """

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """`Task.retry`, with the countdown taken from `exc.retry_after` when it has one."""
        if isinstance(exc, RetryableLLMError) and exc.retry_after is not None and eta is None:
            countdown = min(max(exc.retry_after, 0.0), RETRY_BACKOFF_MAX)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)


def job_trace_attributes(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Trace attributes taken from a job's kwargs: its optional user_id and session_id."""
    return {k: str(kwargs[k]) for k in ("user_id", "session_id") if kwargs.get(k)}


@dataclass
class _Totals:
    """Usage and cost summed over several model calls."""

    calls: int = 0
    model: str = ""
    usage: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0, "total": 0})
    cost_usd: float | None = 0.0

    def add(self, result: ChatResult) -> None:
        self.calls += 1
        self.model = result.model
        self.usage["input"] += result.usage["input"]
        self.usage["output"] += result.usage["output"]
        self.usage["total"] += result.usage["total"]
        if self.cost_usd is not None:
            # One unpriced call makes the total unknown rather than silently too low.
            self.cost_usd = None if result.cost is None else self.cost_usd + result.cost["total"]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "usage": dict(self.usage), "cost_usd": self.cost_usd}


def _stats(result: ChatResult) -> dict[str, Any]:
    totals = _Totals()
    totals.add(result)
    return totals.as_dict()


def _check_ids(user_id: Any, session_id: Any) -> None:
    optional_id_arg("user_id", user_id)
    optional_id_arg("session_id", session_id)


@shared_task(base=LLMJob, name="tasks.summarize", **RETRY_OPTIONS)
@task_options(trace_attributes=job_trace_attributes)
def summarize(
    text: str,
    max_sentences: int = 3,
    *,
    user_id: str | None = None,
    session_id: str | None = None,
    simulate_rate_limits: int = 0,
) -> dict[str, Any]:
    """Summarize `text` in at most `max_sentences` sentences.

    `simulate_rate_limits` (local provider only): the first N attempts get a rate-limit
    error (429, Retry-After 0.5 s), to show retries in the trace.
    """
    text = text_arg("text", text)
    max_sentences = int_arg("max_sentences", max_sentences, low=1, high=20)
    _check_ids(user_id, session_id)
    llm = _client_for_attempt(simulate_rate_limits)
    messages = prompts.summarize_messages(text, max_sentences)
    result = llm.chat(messages, name="summarize", max_tokens=_budget(max_sentences))
    return {"summary": result.text, **_stats(result)}


def _client_for_attempt(simulate_rate_limits: Any) -> LLMClient:
    """The jobs' LLM client, or a rate-limited copy of it while attempts < simulate_rate_limits."""
    n = int_arg("simulate_rate_limits", simulate_rate_limits, low=0, high=MAX_SIMULATED_RATE_LIMITS)
    llm = get_llm_client()
    if n == 0:
        return llm
    if llm.provider.name != "local":
        # Never fake errors in front of a real model: the option is a demo of the local one.
        raise InvalidJobInput("simulate_rate_limits needs the local provider (LLM_PROVIDER=local)")
    attempt = current_task.request.retries if current_task else 0
    if attempt >= n:
        return llm
    limited = copy.copy(llm)
    limited.provider = SimulatedRateLimit()
    return limited


def _budget(sentences: int) -> int:
    """Output token budget for a summary of `sentences` sentences."""
    return min(2048, 120 * sentences)


@shared_task(base=LLMJob, name="tasks.classify", **RETRY_OPTIONS)
@task_options(trace_attributes=job_trace_attributes)
def classify(
    text: str,
    labels: list[str],
    *,
    user_id: str | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """Pick the one label of `labels` that fits `text` best."""
    text = text_arg("text", text)
    labels = labels_arg("labels", labels)
    _check_ids(user_id, session_id)
    result = get_llm_client().chat(
        prompts.classify_messages(text, labels), name="classify", max_tokens=32
    )
    return {"label": match_label(result.text, labels), "answer": result.text, **_stats(result)}


def match_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label a model's free-text answer names (exactly, else contained in it), or None."""
    cleaned = answer.strip().strip("\"'`.").strip().lower()
    for label in labels:
        if cleaned == label.lower():
            return label
    # Longest first, so "not urgent" wins over "urgent" when the answer says "not urgent".
    for label in sorted(labels, key=len, reverse=True):
        if label.lower() in cleaned:
            return label
    return None


@shared_task(base=LLMJob, name="tasks.summarize_labeled", **RETRY_OPTIONS)
@task_options(trace_attributes=job_trace_attributes)
def summarize_labeled(
    classification: dict[str, Any],
    text: str,
    max_sentences: int = 3,
    *,
    user_id: str | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """Chain step after `classify`: summarize `text`, telling the model the label found."""
    if not isinstance(classification, Mapping):
        raise InvalidJobInput(
            f"classification must be the dict returned by tasks.classify, "
            f"got {type(classification).__name__}"
        )
    label = classification.get("label")
    text = text_arg("text", text)
    max_sentences = int_arg("max_sentences", max_sentences, low=1, high=20)
    _check_ids(user_id, session_id)
    messages = prompts.summarize_messages(text, max_sentences, label=label)
    result = get_llm_client().chat(messages, name="summarize", max_tokens=_budget(max_sentences))
    return {"label": label, "summary": result.text, **_stats(result)}


@shared_task(base=LLMJob, name="tasks.combine_summaries", **RETRY_OPTIONS)
@task_options(trace_attributes=job_trace_attributes)
def combine_summaries(
    summaries: list[Any],
    max_sentences: int = 5,
    *,
    user_id: str | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """Chord body: merge the results of several `summarize` tasks into one summary."""
    texts = _summary_texts(summaries)
    max_sentences = int_arg("max_sentences", max_sentences, low=1, high=20)
    _check_ids(user_id, session_id)
    messages = prompts.combine_messages(texts, max_sentences)
    result = get_llm_client().chat(messages, name="combine", max_tokens=_budget(max_sentences))
    parts_cost = [s.get("cost_usd") for s in summaries if isinstance(s, Mapping)]
    return {
        "summary": result.text,
        "parts": len(texts),
        # Cost of the whole map-reduce, when every part reported one.
        "total_cost_usd": _sum_costs([*parts_cost, result.cost["total"] if result.cost else None]),
        **_stats(result),
    }


def _summary_texts(summaries: Any) -> list[str]:
    """Summary texts from a chord header's results (summarize dicts) or plain strings."""
    if isinstance(summaries, str) or not isinstance(summaries, Sequence) or not summaries:
        raise InvalidJobInput("summaries must be a non-empty list of summarize results")
    texts = []
    for index, item in enumerate(summaries):
        value = item.get("summary") if isinstance(item, Mapping) else item
        texts.append(text_arg(f"summaries[{index}]", value))
    return texts


def _sum_costs(costs: Sequence[Any]) -> float | None:
    if any(not isinstance(c, int | float) for c in costs):
        return None
    return float(sum(costs))


@shared_task(base=LLMJob, name="tasks.research_agent", **RETRY_OPTIONS)
@task_options(as_type="agent", trace_attributes=job_trace_attributes)
def research_agent(
    question: str,
    max_steps: int = 4,
    *,
    user_id: str | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """Answer `question` with a bounded tool-using loop (calculator, search, word count)."""
    question = text_arg("question", question, max_chars=MAX_QUESTION_CHARS)
    max_steps = int_arg("max_steps", max_steps, low=1, high=10)
    _check_ids(user_id, session_id)
    return run_agent(question, max_steps, get_llm_client())


def run_agent(question: str, max_steps: int, llm: LLMClient) -> dict[str, Any]:
    """The agent loop: at most `max_steps` model calls, each followed by at most one tool call."""
    messages = prompts.agent_messages(question, tool_specs())
    steps: list[dict[str, Any]] = []
    totals = _Totals()
    for step in range(1, max_steps + 1):
        reply = llm.chat(messages, name=f"agent-step-{step}", max_tokens=400)
        totals.add(reply)
        messages.append(Message(role="assistant", content=reply.text))
        action = parse_action(reply.text)
        if "answer" in action:
            return _agent_result(question, action["answer"], steps, totals)
        output = run_tool(llm.langfuse, action["tool"], action["input"])
        steps.append({"step": step, **action, "output": output})
        messages.append(prompts.observation_message(action["tool"], output))
    return _agent_result(question, None, steps, totals)


def _agent_result(
    question: str, answer: str | None, steps: list[dict[str, Any]], totals: _Totals
) -> dict[str, Any]:
    return {
        "question": question,
        "answer": answer,
        # False when the step budget ran out before the model gave an answer.
        "finished": answer is not None,
        "steps": steps,
        "llm_calls": totals.calls,
        **totals.as_dict(),
    }


def parse_action(text: str) -> dict[str, str]:
    """The model's next action: {"tool", "input"} or {"answer"}.

    Real models sometimes wrap the JSON in prose or skip it; text that holds no tool call
    is taken as the final answer rather than failing the job.
    """
    start, end = text.find("{"), text.rfind("}")
    try:
        data = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("tool"), str):
        return {"tool": data["tool"], "input": str(data.get("input", ""))}
    if isinstance(data, dict) and "answer" in data:
        return {"answer": str(data["answer"])}
    return {"answer": text.strip()}


def run_tool(langfuse: Langfuse, name: str, tool_input: str) -> Any:
    """Run one tool inside a `tool` observation; a tool error goes back to the model."""
    with langfuse.start_as_current_observation(
        as_type="tool", name=name, input={"input": tool_input}
    ) as observation:
        tool = TOOLS.get(name)
        try:
            if tool is None:
                raise ToolError(f"unknown tool {name!r}; available: {', '.join(TOOLS)}")
            output = tool.run(tool_input)
        except ToolError as exc:
            # The agent recovers (it sees the error and can try something else): a warning.
            error = {"error": str(exc)}
            observation.update(output=error, level="WARNING", status_message=f"ToolError: {exc}")
            return error
        except Exception as exc:
            observation.update(level="ERROR", status_message=f"{type(exc).__name__}: {exc}")
            raise
        observation.update(output=output)
        return output

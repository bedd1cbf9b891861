"""Unit tests of the LLM jobs, tools, workflows, `enqueue()` and the producer CLI (no broker)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from celery import Celery
from celery.canvas import _chain, chord
from celery.signals import before_task_publish
from click.testing import CliRunner
from langfuse import Langfuse

import tasks.cli
import tasks.jobs
from tasks import (
    InvalidJobInput,
    RetryableLLMError,
    classify,
    classify_then_summarize,
    combine_summaries,
    enqueue,
    research_agent,
    summarize,
    summarize_labeled,
    summarize_many,
)
from tasks.jobs import job_trace_attributes, match_label, parse_action, run_agent
from tasks.llm import LLMClient, LocalProvider, Message, ProviderReply
from tasks.tools import ToolError, calculator, keyword_search, word_count
from tests.capture import Captured

TEXT = (
    "The invoice shows a duplicate charge. "
    "I paid by card on Monday. "
    "Please refund the second payment to my card. "
    "The weather is nice."
)


# ---- fixtures -----------------------------------------------------------------------------




@pytest.fixture
def llm(captured: Captured, monkeypatch: pytest.MonkeyPatch) -> LLMClient:
    """The jobs' LLM client: the local model without latency, recording into `captured`."""
    client = LLMClient(
        LocalProvider(latency_ms=0), default_model="local-extractive-1", langfuse=captured.langfuse
    )
    monkeypatch.setattr(tasks.jobs, "get_llm_client", lambda: client)
    return client


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    """A producer app on Celery's in-process memory broker and cache backend."""
    app = Celery("test-producer", broker="memory://", backend="cache+memory://")
    yield app
    app.close()


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """Headers of every message published while the test runs."""
    seen: list[dict[str, Any]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        # Keep the object itself: handlers connected later (tracing's) still add to it.
        seen.append(headers if headers is not None else {})

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


class ScriptedProvider:
    """A provider that replies with the given texts in order."""

    name = "scripted"

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)

    def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        stream: bool = False,
    ) -> ProviderReply:
        """Return the next scripted reply."""
        return ProviderReply(self.replies.pop(0), 10, 5, model)


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: summarize(""), "text"),
        (lambda: summarize(42), "text"),
        (lambda: summarize(TEXT, max_sentences=0), "max_sentences"),
        (lambda: summarize(TEXT, max_sentences=True), "max_sentences"),
        (lambda: summarize(TEXT, user_id=7), "user_id"),
        (lambda: classify(TEXT, ["only-one"]), "labels"),
        (lambda: classify(TEXT, "billing,technical"), "labels"),
        (lambda: classify(TEXT, ["a", "A"]), "labels"),
        (lambda: classify(TEXT, ["a", ""]), "labels[1]"),
        (lambda: research_agent("   "), "question"),
        (lambda: research_agent("Why?", max_steps=11), "max_steps"),
        (lambda: combine_summaries([]), "summaries"),
        (lambda: combine_summaries([{"summary": ""}]), "summaries[0]"),
        (lambda: summarize_labeled("not a dict", TEXT), "classification"),
    ],
)
def test_bad_input_raises_invalid_job_input_naming_the_argument(call: Any, argument: str) -> None:
    """Every job refuses a bad argument with InvalidJobInput whose message names it."""
    with pytest.raises(InvalidJobInput) as info:
        call()
    assert str(info.value).startswith(argument)


def test_only_transient_llm_errors_are_retried() -> None:
    """Tasks autoretry RetryableLLMError with bounded backoff, never InvalidJobInput."""
    for task in (summarize, classify, research_agent, combine_summaries, summarize_labeled):
        assert task.autoretry_for == (RetryableLLMError,)
        assert task.retry_backoff and 0 < task.max_retries <= 10
        assert not issubclass(InvalidJobInput, RetryableLLMError)
    assert issubclass(InvalidJobInput, ValueError)


def test_tasks_are_registered_under_stable_names() -> None:
    """Producers send by name, so the task names are part of the interface."""
    names = {t.name for t in (summarize, classify, research_agent, combine_summaries)}
    assert names == {
        "tasks.summarize",
        "tasks.classify",
        "tasks.research_agent",
        "tasks.combine_summaries",
    }
    assert summarize_labeled.name == "tasks.summarize_labeled"


def test_trace_attribute_extractor_takes_user_and_session() -> None:
    """The extractor maps the optional user_id/session_id kwargs and ignores the rest."""
    assert job_trace_attributes({"text": "x", "user_id": "u1", "session_id": None}) == {
        "user_id": "u1"
    }
    assert job_trace_attributes({"text": "x"}) == {}


# ---- jobs on the local model --------------------------------------------------------------


def test_summarize_returns_a_json_result_with_usage_and_cost(llm: LLMClient) -> None:
    """summarize returns the summary plus model, token usage and cost, all JSON-serialisable."""
    result = summarize(TEXT, max_sentences=2, user_id="u1")
    json.dumps(result)
    assert result["summary"].count(".") == 2
    assert "weather" not in result["summary"]
    assert result["model"] == "local-extractive-1"
    assert result["usage"]["total"] == result["usage"]["input"] + result["usage"]["output"]
    assert result["cost_usd"] > 0


def test_classify_maps_the_answer_to_a_label(llm: LLMClient) -> None:
    """classify returns one of the given labels."""
    result = classify(TEXT, ["technical", "billing", "other"])
    assert result["label"] == "billing"
    json.dumps(result)


def test_match_label_reads_free_text_answers() -> None:
    """Quotes, case and surrounding prose are tolerated; an unknown answer gives None."""
    labels = ["urgent", "not urgent"]
    assert match_label(' "Urgent". ', labels) == "urgent"
    assert match_label("I would say this is not urgent at all", labels) == "not urgent"
    assert match_label("no idea", labels) is None


def test_chain_and_chord_steps_accept_upstream_results(llm: LLMClient) -> None:
    """summarize_labeled takes classify's result; combine_summaries takes summarize results."""
    labeled = summarize_labeled(classify(TEXT, ["billing", "other"]), TEXT, max_sentences=1)
    assert labeled["label"] == "billing"
    parts = [summarize(TEXT, 1), summarize("Redis stores the queue. It is fast.", 1)]
    combined = combine_summaries(parts, max_sentences=5)
    assert combined["parts"] == 2
    assert parts[0]["summary"] in combined["summary"]
    expected_total = sum(p["cost_usd"] for p in parts) + combined["cost_usd"]
    assert combined["total_cost_usd"] == pytest.approx(expected_total)


# ---- research agent -----------------------------------------------------------------------


def test_agent_uses_tools_and_answers(llm: LLMClient) -> None:
    """The scripted local agent calculates, searches, then answers within its step budget."""
    result = research_agent("What is 17 * 23 + 4, and what is Celery?", max_steps=4)
    json.dumps(result)
    assert result["finished"] is True
    assert [s["tool"] for s in result["steps"]] == ["calculator", "keyword_search"]
    assert result["steps"][0]["output"] == 395
    assert "395" in result["answer"] and "Celery" in result["answer"]
    assert result["llm_calls"] == 3


def test_agent_stops_at_max_steps(llm: LLMClient) -> None:
    """With a budget of one step the agent stops unfinished after one model call."""
    result = research_agent("What is 2 + 2 and what is Redis?", max_steps=1)
    assert result["finished"] is False
    assert result["answer"] is None
    assert result["llm_calls"] == 1
    assert len(result["steps"]) == 1


def test_agent_records_tool_and_generation_observations(llm: LLMClient, captured: Captured) -> None:
    """Each step is a generation and each tool call a tool observation under the agent."""
    with captured.langfuse.start_as_current_observation(
        name="tasks.research_agent", as_type="agent"
    ):
        run_agent('How many words are in "one two three"?', 4, llm)
    (agent,) = captured.spans("agent")
    tools = captured.spans("tool")
    generations = captured.spans("generation")
    assert [t.name for t in tools] == ["keyword_search", "word_count"]
    assert [g.name for g in generations] == ["agent-step-1", "agent-step-2", "agent-step-3"]
    assert agent.context is not None
    assert all(s.parent and s.parent.span_id == agent.context.span_id for s in tools + generations)
    word_count_output = (tools[1].attributes or {})["langfuse.observation.output"]
    assert json.loads(str(word_count_output)) == 3


def test_agent_survives_an_unknown_tool(captured: Captured) -> None:
    """A call to a missing tool becomes a WARNING tool observation and the loop goes on."""
    provider = ScriptedProvider(['{"tool": "teleport", "input": "Mars"}', "It cannot be done."])
    client = LLMClient(provider, default_model="scripted", langfuse=captured.langfuse)
    result = run_agent("Go to Mars", 3, client)
    assert result["answer"] == "It cannot be done."
    assert "unknown tool" in result["steps"][0]["output"]["error"]
    (tool,) = captured.spans("tool")
    assert (tool.attributes or {})["langfuse.observation.level"] == "WARNING"


def test_parse_action_accepts_json_in_prose_and_plain_answers() -> None:
    """Tool calls wrapped in prose are found; text without a tool call is the answer."""
    assert parse_action('Sure! {"tool": "calculator", "input": "1+1"} ok') == {
        "tool": "calculator",
        "input": "1+1",
    }
    assert parse_action('{"answer": "42"}') == {"answer": "42"}
    assert parse_action("Plainly 42.") == {"answer": "Plainly 42."}


def test_tools_are_deterministic_and_refuse_bad_input() -> None:
    """Tools compute locally and raise ToolError for input they cannot handle."""
    assert word_count("one, two three") == 3
    assert calculator("(2 + 3) * 4 / 2") == 10
    assert keyword_search("redis broker")[0]["title"] == "Redis"
    for expression in ("__import__('os')", "9 ** 9999", "1 / 0", "x" * 201):
        with pytest.raises(ToolError):
            calculator(expression)
    with pytest.raises(ToolError):
        keyword_search("a b")


# ---- workflows ----------------------------------------------------------------------------


def test_classify_then_summarize_is_a_two_step_chain(memory_app: Celery) -> None:
    """The chain classifies, then passes the result to summarize_labeled with the text."""
    canvas = classify_then_summarize(TEXT, ["billing", "other"], app=memory_app)
    assert isinstance(canvas, _chain)
    first, second = canvas.tasks
    assert (first.task, second.task) == ("tasks.classify", "tasks.summarize_labeled")
    assert first.kwargs == {"text": TEXT, "labels": ["billing", "other"]}
    assert second.kwargs == {"text": TEXT, "max_sentences": 3}


def test_summarize_many_is_a_chord_of_summaries(memory_app: Celery) -> None:
    """The chord runs one summarize per text and combine_summaries over the results."""
    canvas = summarize_many(["First text.", "Second text."], app=memory_app)
    assert isinstance(canvas, chord)
    assert [s.task for s in canvas.tasks] == ["tasks.summarize", "tasks.summarize"]
    assert [s.kwargs["text"] for s in canvas.tasks] == ["First text.", "Second text."]
    assert canvas.body.task == "tasks.combine_summaries"


def test_workflows_validate_before_sending() -> None:
    """A bad workflow argument is refused while building the canvas."""
    with pytest.raises(InvalidJobInput, match=r"^texts"):
        summarize_many([])
    with pytest.raises(InvalidJobInput, match=r"^labels"):
        classify_then_summarize(TEXT, ["one"])


# ---- enqueue ------------------------------------------------------------------------------


def test_enqueue_sends_by_name_with_trace_headers(
    memory_app: Celery, published: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single job is sent by task name, carries the trace attributes and is its own root."""
    monkeypatch.setenv("LANGFUSE_BASE_URL", "http://langfuse.local/")
    sent = enqueue(
        "summarize", app=memory_app, user_id="u-1", session_id="s-1", tags=["demo"], text=TEXT
    )
    (headers,) = published
    assert headers["task"] == "tasks.summarize"
    assert headers["id"] == sent.task_id and headers["root_id"] == sent.task_id
    assert "u-1" in json.dumps(headers, default=str)
    assert sent.trace_id == Langfuse.create_trace_id(seed=sent.task_id)
    assert sent.url == f"http://langfuse.local/trace/{sent.trace_id}"


def test_enqueue_sends_a_chord_as_a_user_writes_it(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    """A chord is sent with a plain apply_async (no root_id= workaround): the returned task id
    is its callback's, and its trace id derives from the group id every member carries."""
    sent = enqueue("chord", app=memory_app, texts=["One text.", "Another text."])
    assert [h["task"] for h in published] == ["tasks.summarize", "tasks.summarize"]
    assert all(h["root_id"] == h["id"] for h in published)  # Celery's own root ids
    assert {h["group"] for h in published} == {sent.root_id}
    assert sent.task_id not in {h["id"] for h in published}
    assert sent.trace_id == Langfuse.create_trace_id(seed=sent.root_id)


def test_enqueue_chain_roots_at_its_first_link(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    """A chain's trace derives from its first link (Celery's root id); the returned task id
    is its last link's, whose result is the job's."""
    sent = enqueue("chain", app=memory_app, text=TEXT, labels=["billing", "other"])
    (headers,) = published
    assert headers["task"] == "tasks.classify"
    assert headers["root_id"] == headers["id"] == sent.root_id != sent.task_id
    assert sent.trace_id == Langfuse.create_trace_id(seed=sent.root_id)


@pytest.mark.parametrize(
    ("job", "kwargs", "message"),
    [
        ("translate", {"text": "x"}, "unknown job 'translate'"),
        ("summarize", {}, "missing a required argument: 'text'"),
        ("summarize", {"text": "x", "colour": "red"}, "unexpected keyword argument 'colour'"),
        ("agent", {"question": "Why?", "max_steps": 0}, "max_steps"),
    ],
)
def test_enqueue_refuses_bad_jobs_before_sending(
    memory_app: Celery,
    published: list[dict[str, Any]],
    job: str,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    """Unknown jobs and bad arguments raise InvalidJobInput and publish nothing."""
    with pytest.raises(InvalidJobInput, match=message):
        enqueue(job, app=memory_app, **kwargs)
    assert published == []


# ---- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def runner(memory_app: Celery, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner whose producer app is the in-memory one."""
    monkeypatch.setattr(tasks.cli, "producer_app", lambda: memory_app)
    monkeypatch.delenv("LANGFUSE_BASE_URL", raising=False)
    monkeypatch.delenv("LANGFUSE_HOST", raising=False)
    return CliRunner()


def test_cli_help_lists_the_commands(runner: CliRunner) -> None:
    """--help documents the enqueue subcommands and score."""
    top = runner.invoke(tasks.cli.main, ["--help"])
    assert top.exit_code == 0 and "enqueue" in top.output and "score" in top.output
    sub = runner.invoke(tasks.cli.main, ["enqueue", "--help"])
    for command in ("summarize", "classify", "agent", "chord", "chain"):
        assert command in sub.output
    summarize_help = runner.invoke(tasks.cli.main, ["enqueue", "summarize", "--help"])
    for option in ("--text", "--user-id", "--session-id", "--tag", "--wait", "--timeout"):
        assert option in summarize_help.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "summarize"], "Missing option '--text'"),
        (["enqueue", "summarize", "--text", "x", "--max-sentences", "0"], "--max-sentences"),
        (["enqueue", "classify", "--text", "x", "--label", "a"], "labels needs 2 to"),
        (["enqueue", "summarize", "--text", "  "], "text must not be empty"),
        (["enqueue", "agent", "--question", "q", "--timeout", "0"], "--timeout"),
        (["enqueue", "fly"], "No such command 'fly'"),
    ],
)
def test_cli_argument_errors_are_clear(runner: CliRunner, args: list[str], message: str) -> None:
    """Bad arguments exit with status 2 and a message naming the problem."""
    result = runner.invoke(tasks.cli.main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_cli_enqueue_prints_task_and_trace_ids(
    runner: CliRunner, published: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """enqueue prints the task id, the derived trace id and, with LANGFUSE_BASE_URL, its URL."""
    monkeypatch.setenv("LANGFUSE_BASE_URL", "http://lf:3000")
    args = ["enqueue", "agent", "--question", "What is 1 + 1?", "--user-id", "u", "--json"]
    result = runner.invoke(tasks.cli.main, args)
    assert result.exit_code == 0, result.output
    output = json.loads(result.output)
    assert output["task_id"] == published[0]["id"]
    assert output["trace_id"] == Langfuse.create_trace_id(seed=output["task_id"])
    assert output["url"] == f"http://lf:3000/trace/{output['trace_id']}"


def test_cli_reports_an_unreachable_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the broker down the CLI fails fast with exit status 1 naming the broker."""
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:secret@127.0.0.1:1/0")
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    result = CliRunner().invoke(tasks.cli.main, ["enqueue", "summarize", "--text", "Hello."])
    assert result.exit_code == 1
    assert "could not send the job via redis://:**@127.0.0.1:1/0" in result.output
    assert "secret" not in result.output


def test_cli_score_parses_numbers_and_categories(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """score passes a number as float and anything else as a categorical string."""
    calls: list[tuple[Any, ...]] = []

    def fake_score(task_id: str, name: str, value: Any, **kwargs: Any) -> str:
        calls.append((task_id, name, value, kwargs))
        return "trace-123"

    monkeypatch.setattr(tasks.cli.tracing, "score_task", fake_score)
    result = runner.invoke(tasks.cli.main, ["score", "t-1", "quality", "0.8", "--comment", "ok"])
    assert result.exit_code == 0, result.output
    assert "trace trace-123" in result.output
    runner.invoke(tasks.cli.main, ["score", "t-1", "verdict", "good", "--root-id", "r-1"])
    assert calls == [
        ("t-1", "quality", 0.8, {"comment": "ok", "root_id": None}),
        ("t-1", "verdict", "good", {"comment": None, "root_id": "r-1"}),
    ]

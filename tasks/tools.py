"""Deterministic local tools for the research agent: word count, corpus search, calculator."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# A small built-in corpus, so the agent has something to search without a network.
CORPUS: dict[str, str] = {
    "Celery": (
        "Celery is a distributed task queue for Python. Producers send task messages to a "
        "broker such as Redis or RabbitMQ, and worker processes execute them. Canvas "
        "primitives such as chains, groups and chords compose tasks into workflows."
    ),
    "Redis": (
        "Redis is an in-memory data store used as a database, cache and message broker. "
        "Celery can use Redis both as its broker and as its result backend. Redis lists "
        "hold the queued task messages."
    ),
    "Langfuse": (
        "Langfuse is an open-source LLM engineering platform for tracing, evaluation and "
        "prompt management. A trace groups observations such as spans, generations, tools "
        "and agents. Generations record the model, token usage and cost of each LLM call."
    ),
    "OpenTelemetry": (
        "OpenTelemetry is a vendor-neutral standard for traces, metrics and logs. A span "
        "has a trace id, a span id and a parent. The W3C traceparent header carries the "
        "trace context between processes."
    ),
    "Prefork pool": (
        "Celery's prefork pool runs tasks in child processes forked from the worker. A "
        "child may be recycled after a number of tasks, and it exits with os._exit, so "
        "atexit handlers never run in it."
    ),
    "Token pricing": (
        "LLM providers bill per token, with separate prices for input and output tokens. "
        "Prices are usually quoted in US dollars per million tokens. Small models cost a "
        "fraction of a dollar per million input tokens."
    ),
    "Retries": (
        "Transient errors such as rate limits, timeouts and server errors are worth "
        "retrying with exponential backoff and jitter. Client errors such as a malformed "
        "request are not, because the same request fails again."
    ),
}


class ToolError(ValueError):
    """A tool could not handle its input; the agent sees the message and may try again."""


@dataclass(frozen=True)
class Tool:
    """A named tool the agent can call with one string input."""

    name: str
    description: str
    run: Callable[[str], Any]


def word_count(text: str) -> int:
    """Number of words in `text`."""
    return len(_WORD.findall(text))


def keyword_search(query: str, limit: int = 3) -> list[dict[str, Any]]:
    """Corpus documents ranked by how many query words they contain, best sentence first."""
    terms = {w.lower() for w in _WORD.findall(query) if len(w) > 2}
    if not terms:
        raise ToolError("keyword_search needs at least one word of 3+ letters")
    hits: list[dict[str, Any]] = []
    for title, body in CORPUS.items():
        words = [w.lower() for w in _WORD.findall(f"{title} {body}")]
        score = sum(words.count(t) for t in terms)
        if score:
            hits.append({"title": title, "snippet": _best_sentence(body, terms), "score": score})
    hits.sort(key=lambda h: (-h["score"], h["title"]))
    return hits[:limit]


def _best_sentence(body: str, terms: set[str]) -> str:
    sentences = _SENTENCE_END.split(body)
    scores = [sum(w.lower() in terms for w in _WORD.findall(s)) for s in sentences]
    return sentences[scores.index(max(scores))]


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def calculator(expression: str) -> int | float:
    """Value of an arithmetic expression (+ - * / // % ** and parentheses, no names)."""
    if len(expression) > 200:
        raise ToolError("calculator input is longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return _evaluate(tree.body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as exc:
        raise ToolError(f"calculator cannot evaluate {expression!r}: {exc}") from None


def _evaluate(node: ast.expr) -> int | float:
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        # Huge powers would hang the worker; no agent question needs them.
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ToolError("calculator refuses powers that large")
        return _BINARY[type(node.op)](left, right)
    allowed = "numbers and + - * / // % **"
    raise ToolError(f"calculator accepts {allowed} only, not {type(node).__name__}")


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("word_count", "Count the words in the input text.", word_count),
        Tool("keyword_search", "Search a small knowledge base; input: keywords.", keyword_search),
        Tool("calculator", "Evaluate an arithmetic expression, e.g. 17 * 23 + 4.", calculator),
    )
}


def tool_specs() -> list[dict[str, str]]:
    """Name and description of every tool, as shown to the model."""
    return [{"name": t.name, "description": t.description} for t in TOOLS.values()]

"""Prompts for the LLM jobs.

They are written for a real chat model, and each carries a fixed phrase followed by its
parameters (sentence count, JSON label list, JSON tool list) that the offline local model
recognises, so the same prompts drive both providers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .llm import Message
from .llm._local import (
    LABELS_MARKER,
    OBSERVATION_PREFIX,
    QUESTION_PREFIX,
    SUMMARY_MARKER,
    TOOLS_MARKER,
)


def summarize_messages(text: str, max_sentences: int, label: str | None = None) -> list[Message]:
    """Chat messages asking for a summary of `text` in at most `max_sentences` sentences."""
    context = f" The text was classified as {label!r}." if label else ""
    system = (
        "You are a precise summarizer. Summarize the user's text "
        f"{SUMMARY_MARKER}{max_sentences} sentences, reusing its own sentences where "
        f"possible.{context} Reply with the summary only."
    )
    return [Message(role="system", content=system), Message(role="user", content=text)]


def classify_messages(text: str, labels: Sequence[str]) -> list[Message]:
    """Chat messages asking to pick exactly one of `labels` for `text`."""
    system = (
        "You are a text classifier. Choose exactly one label for the user's text "
        f"{LABELS_MARKER}{json.dumps(list(labels))}. Reply with the label only."
    )
    return [Message(role="system", content=system), Message(role="user", content=text)]


def agent_messages(question: str, tools: Sequence[dict[str, str]]) -> list[Message]:
    """Opening messages of the research agent: the tool protocol and the question."""
    system = (
        "You are a research agent. Answer the user's question using tools. "
        f"{TOOLS_MARKER}{json.dumps(list(tools))}. Reply with exactly one JSON object and "
        'nothing else: {"tool": "<name>", "input": "<string>"} to call a tool, or '
        '{"answer": "<text>"} when you can answer. Tool results arrive as messages starting '
        f"with {OBSERVATION_PREFIX!r}."
    )
    return [
        Message(role="system", content=system),
        Message(role="user", content=QUESTION_PREFIX + question),
    ]


def observation_message(tool: str, result: object) -> Message:
    """The message that hands a tool's result back to the agent's model."""
    return Message(role="user", content=f"{OBSERVATION_PREFIX}{tool}: {json.dumps(result)}")


def combine_messages(summaries: Sequence[str], max_sentences: int) -> list[Message]:
    """Chat messages asking to merge several partial summaries into one."""
    joined = "\n".join(s.strip() for s in summaries)
    return summarize_messages(joined, max_sentences)

"""Input validation shared by the jobs (worker side) and the producer CLI.

A bad argument raises `InvalidJobInput` naming the argument: the task fails once with that
reason (it is never auto-retried), and the CLI reports it before anything is sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MAX_TEXT_CHARS = 100_000
MAX_LABELS = 50
MAX_LABEL_CHARS = 100
MAX_TEXTS = 100


class InvalidJobInput(ValueError):
    """A job argument is missing, of the wrong type or out of range."""


def text_arg(name: str, value: Any, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """`value` if it is a non-blank string of at most `max_chars` characters."""
    if not isinstance(value, str):
        raise InvalidJobInput(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidJobInput(f"{name} must not be empty")
    if len(value) > max_chars:
        raise InvalidJobInput(f"{name} is {len(value)} characters long; the limit is {max_chars}")
    return value


def int_arg(name: str, value: Any, *, low: int, high: int) -> int:
    """`value` if it is an integer in [low, high] (a whole float such as 3.0 is accepted)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # JSON producers in other languages may send 3.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobInput(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidJobInput(f"{name} must be between {low} and {high}, got {value}")
    return value


def labels_arg(name: str, value: Any) -> list[str]:
    """`value` if it is a list of 2..MAX_LABELS distinct, non-blank strings."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidJobInput(f"{name} must be a list of strings, got {type(value).__name__}")
    labels = [
        text_arg(f"{name}[{i}]", v, max_chars=MAX_LABEL_CHARS).strip() for i, v in enumerate(value)
    ]
    if not 2 <= len(labels) <= MAX_LABELS:
        raise InvalidJobInput(f"{name} needs 2 to {MAX_LABELS} labels, got {len(labels)}")
    lowered = [label.lower() for label in labels]
    if len(set(lowered)) != len(lowered):
        raise InvalidJobInput(f"{name} has duplicates: {labels}")
    return labels


def texts_arg(name: str, value: Any) -> list[str]:
    """`value` if it is a non-empty list of at most MAX_TEXTS valid texts."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidJobInput(f"{name} must be a list of strings, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_TEXTS:
        raise InvalidJobInput(f"{name} needs 1 to {MAX_TEXTS} texts, got {len(value)}")
    return [text_arg(f"{name}[{i}]", v) for i, v in enumerate(value)]


def optional_id_arg(name: str, value: Any) -> str | None:
    """`value` if it is None or a non-blank string of at most 200 characters."""
    if value is None:
        return None
    return text_arg(name, value, max_chars=200)

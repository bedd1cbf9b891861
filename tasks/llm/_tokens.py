"""A small word/punctuation tokenizer used to count and cut tokens offline."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ._types import Message

_TOKEN = re.compile(r"\w+|[^\w\s]")
# OpenAI-style chat framing: a few tokens per message plus a reply primer.
_PER_MESSAGE = 4
_REPLY_PRIMER = 3


def count_tokens(text: str) -> int:
    """Number of tokens in `text`: each word and each punctuation mark counts as one."""
    return sum(1 for _ in _TOKEN.finditer(text))


def count_message_tokens(messages: Sequence[Message]) -> int:
    """Prompt tokens of a chat request, including per-message framing overhead."""
    content = sum(count_tokens(m["content"]) + _PER_MESSAGE for m in messages)
    return content + _REPLY_PRIMER


def truncate_tokens(text: str, max_tokens: int) -> str:
    """`text` cut after its first `max_tokens` tokens (unchanged if shorter)."""
    for index, match in enumerate(_TOKEN.finditer(text)):
        if index + 1 == max_tokens:
            return text[: match.end()]
    return text

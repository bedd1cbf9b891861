"""The offline deterministic "model": no network, no key, no download.

It recognises the fixed phrases our prompts carry and answers like a small model would:
  - "... in at most N sentences ..."       -> extractive summary (top sentences by word frequency)
  - "... from this JSON list: [labels] ..." -> keyword classifier over the given labels
  - "... Available tools (JSON): [...] ..." -> a scripted tool choice for the research agent
Anything else gets a one-sentence extractive summary of the last user message.
Token counts come from a word/punctuation tokenizer; latency is LLM_LOCAL_LATENCY_MS.
`SimulatedRateLimit` stands in for it on attempts a job asks to be rate-limited (demos).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ._errors import RetryableLLMError
from ._tokens import count_message_tokens, count_tokens, truncate_tokens
from ._types import Message, ProviderReply

SUMMARY_MARKER = "in at most "
LABELS_MARKER = "from this JSON list: "
TOOLS_MARKER = "Available tools (JSON): "
QUESTION_PREFIX = "Question: "
OBSERVATION_PREFIX = "Observation from "

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_SUMMARY_COUNT = re.compile(re.escape(SUMMARY_MARKER) + r"(\d+) sentence")
_EXPRESSION = re.compile(r"[\d.(][\d.()\s]*(?:(?:\*\*|//|[-+*/%])[\s(]*-?[\d.]+[\d.()\s]*)+")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_STOPWORD_TEXT = (
    "a an and are as at be been but by can could did do does for from had has have how i if "
    "in into is it its it's of on or our so such than that the their them then there these "
    "they this those to was we were what when where which who why will with would you your "
    "about also not no yes many much more most some any each other only own same very just"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Words that signal common labels beyond the label's own name.
_LEXICON: dict[str, tuple[str, ...]] = {
    "billing": ("invoice", "payment", "charge", "refund", "bill", "price", "subscription"),
    "technical": ("error", "bug", "crash", "fail", "broken", "install", "timeout", "exception"),
    "bug": ("error", "crash", "fail", "broken", "exception", "wrong"),
    "account": ("login", "password", "sign", "profile", "email", "locked"),
    "sales": ("buy", "purchase", "quote", "pricing", "demo", "discount", "upgrade"),
    "positive": ("good", "great", "excellent", "love", "happy", "amazing", "thank", "fast"),
    "negative": ("bad", "terrible", "hate", "slow", "angry", "awful", "poor", "worst"),
    "sports": ("game", "team", "match", "player", "league", "season", "goal"),
    "politics": ("election", "government", "minister", "vote", "policy", "parliament"),
    "technology": ("software", "computer", "model", "cloud", "data", "chip", "code"),
    "finance": ("market", "stock", "bank", "interest", "inflation", "investor", "revenue"),
    "health": ("doctor", "patient", "disease", "hospital", "vaccine", "medical"),
    "science": ("research", "study", "experiment", "physics", "biology", "scientist"),
}


class LocalProvider:
    """Deterministic offline chat model; see the module docstring for what it understands."""

    name = "local"

    def __init__(self, *, latency_ms: int = 5) -> None:
        self._latency_s = latency_ms / 1000

    def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        stream: bool = False,
    ) -> ProviderReply:
        """Answer `messages` deterministically (temperature is ignored: output never varies)."""
        if self._latency_s:
            time.sleep(self._latency_s)
        first_token = datetime.now(UTC)
        text = truncate_tokens(respond(messages), max_tokens)
        return ProviderReply(
            text=text,
            input_tokens=count_message_tokens(messages),
            output_tokens=count_tokens(text),
            model=model,
            completion_start_time=first_token,
        )


class SimulatedRateLimit:
    """The local model answering HTTP 429: every call raises `RetryableLLMError`.

    A job swaps it in for the attempts it wants rate-limited (`simulate_rate_limits`), so
    the retry path (a failed generation, a retried attempt, a later success) can be seen
    without a real provider. `retry_after` plays the 429's Retry-After header, in seconds.
    """

    name = "local"

    def __init__(self, *, retry_after: float = 0.5) -> None:
        self.retry_after = retry_after

    def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        stream: bool = False,
    ) -> ProviderReply:
        """Fail like a rate-limited server would."""
        raise RetryableLLMError(
            f"429 Too Many Requests (simulated by the local provider; "
            f"retry after {self.retry_after:g}s)",
            status_code=429,
            retry_after=self.retry_after,
        )


def respond(messages: Sequence[Message]) -> str:
    """The local model's reply to a conversation."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if TOOLS_MARKER in system:
        return json.dumps(agent_action(messages, _json_after(system, TOOLS_MARKER)))
    if LABELS_MARKER in system:
        return classify(user, [str(label) for label in _json_after(system, LABELS_MARKER)])
    match = _SUMMARY_COUNT.search(system)
    return summarize(user, int(match.group(1)) if match else 1)


def _json_after(text: str, marker: str) -> list[Any]:
    """The JSON list that follows `marker` in `text` (empty if it does not parse)."""
    start = text.index(marker) + len(marker)
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, split after . ! ? and at line breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1]


def summarize(text: str, max_sentences: int) -> str:
    """The `max_sentences` sentences richest in the text's frequent words, in text order."""
    sentences = split_sentences(text)
    if len(sentences) <= max_sentences:
        return " ".join(sentences)
    frequency = Counter(_content_words(text))
    top = max(frequency.values(), default=1)

    def score(sentence: str) -> float:
        words = _content_words(sentence)
        # Square-root length normalisation: favours dense sentences without favouring fragments.
        return sum(frequency[w] / top for w in words) / math.sqrt(len(words) or 1)

    ranked = sorted(range(len(sentences)), key=lambda i: (-score(sentences[i]), i))
    return " ".join(sentences[i] for i in sorted(ranked[:max_sentences]))


def classify(text: str, labels: Sequence[str]) -> str:
    """The label whose name and associated keywords occur most often in `text`."""
    if not labels:
        return ""
    words = _WORD.findall(text.lower())
    scores = [_label_score(words, label) for label in labels]
    if max(scores) == 0:
        # Nothing matched: prefer an explicit catch-all label if the caller offered one.
        fallback = [lb for lb in labels if lb.lower() in ("other", "unknown", "neutral", "none")]
        return fallback[0] if fallback else labels[0]
    return labels[scores.index(max(scores))]


def _label_score(words: Sequence[str], label: str) -> int:
    keywords: list[str] = []
    for part in _WORD.findall(label.lower()):
        keywords += [part, *_LEXICON.get(part, ())]
    return sum(1 for w in words for k in keywords if _matches(w, k))


def _matches(word: str, keyword: str) -> bool:
    # Short keywords must match exactly ("ai" is not "air"); longer ones by a 5-letter stem.
    if len(keyword) <= 3:
        return word == keyword
    return word.startswith(keyword[:5])


def agent_action(messages: Sequence[Message], tools: Sequence[Any]) -> dict[str, str]:
    """Next action of the scripted agent: calculator, then search, then word count, then answer."""
    names = {t.get("name") for t in tools if isinstance(t, dict)}
    question = _question(messages)
    done = _observations(messages)
    expression = _expression(question)
    quoted = _quoted(question)
    if expression and "calculator" in names and "calculator" not in done:
        return {"tool": "calculator", "input": expression}
    keywords = " ".join(dict.fromkeys(w for w in _content_words(question) if not w.isdigit()))
    if keywords and "keyword_search" in names and "keyword_search" not in done:
        return {"tool": "keyword_search", "input": keywords}
    if quoted and "word_count" in names and "word_count" not in done:
        return {"tool": "word_count", "input": quoted}
    return {"answer": _compose_answer(done, expression, quoted)}


def _question(messages: Sequence[Message]) -> str:
    for m in messages:
        if m["role"] == "user" and m["content"].startswith(QUESTION_PREFIX):
            return m["content"][len(QUESTION_PREFIX) :]
    return ""


def _observations(messages: Sequence[Message]) -> dict[str, Any]:
    """Tool name -> last result, from the observation messages so far."""
    seen: dict[str, Any] = {}
    for m in messages:
        content = m["content"]
        if m["role"] != "user" or not content.startswith(OBSERVATION_PREFIX):
            continue
        tool, _, payload = content[len(OBSERVATION_PREFIX) :].partition(": ")
        try:
            seen[tool] = json.loads(payload)
        except json.JSONDecodeError:
            seen[tool] = payload
    return seen


def _expression(question: str) -> str:
    match = _EXPRESSION.search(question)
    return match.group(0).strip().rstrip(".") if match else ""


def _quoted(question: str) -> str:
    match = _QUOTED.search(question)
    return (match.group(1) or match.group(2)) if match else ""


def _compose_answer(done: dict[str, Any], expression: str, quoted: str) -> str:
    parts = []
    hits = done.get("keyword_search")
    if isinstance(hits, list) and hits and isinstance(hits[0], dict):
        parts.append(f"According to {hits[0].get('title')!r}: {hits[0].get('snippet')}")
    if "calculator" in done:
        parts.append(f"{expression} = {_render(done['calculator'])}.")
    if "word_count" in done:
        parts.append(f"The quoted text has {_render(done['word_count'])} words.")
    return " ".join(parts) or "I found nothing relevant to the question."


def _render(value: Any) -> str:
    if isinstance(value, dict) and "error" in value:
        return f"unknown ({value['error']})"
    return str(value)

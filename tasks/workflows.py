"""Celery canvases over the LLM jobs, built from task names.

Signatures are made by name (`app.signature("tasks.summarize", ...)`), so a producer can
build and send them without importing the task code. Arguments are validated here too, so a
bad workflow is refused before anything reaches the broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, chain, chord, group, signature
from celery.canvas import Signature

from .validation import int_arg, labels_arg, text_arg, texts_arg


def _sig(app: Celery | None, name: str, **kwargs: Any) -> Signature:
    # Without an app, the signature binds to Celery's current app when it is sent.
    if app is None:
        return signature(name, kwargs=kwargs)
    return app.signature(name, kwargs=kwargs)


def classify_then_summarize(
    text: str,
    labels: Sequence[str],
    *,
    max_sentences: int = 3,
    app: Celery | None = None,
) -> chain:
    """Chain: `tasks.classify`, then `tasks.summarize_labeled` given its result and the text."""
    text = text_arg("text", text)
    labels = labels_arg("labels", labels)
    max_sentences = int_arg("max_sentences", max_sentences, low=1, high=20)
    return chain(
        _sig(app, "tasks.classify", text=text, labels=labels),
        # Receives classify's result as its first argument; the text travels as a kwarg.
        _sig(app, "tasks.summarize_labeled", text=text, max_sentences=max_sentences),
    )


def summarize_many(
    texts: Sequence[str],
    *,
    max_sentences: int = 3,
    combined_sentences: int = 5,
    app: Celery | None = None,
) -> chord:
    """Chord: one `tasks.summarize` per text, then `tasks.combine_summaries` over the results."""
    texts = texts_arg("texts", texts)
    max_sentences = int_arg("max_sentences", max_sentences, low=1, high=20)
    combined_sentences = int_arg("combined_sentences", combined_sentences, low=1, high=20)
    header = group(_sig(app, "tasks.summarize", text=t, max_sentences=max_sentences) for t in texts)
    return chord(header, _sig(app, "tasks.combine_summaries", max_sentences=combined_sentences))

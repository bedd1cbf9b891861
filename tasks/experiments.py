"""An experiment on this service's jobs: classify support tickets, score the labels.

``tasks.classify_item`` is the experiment's Celery task: it takes one item (``input`` =
``{"text", "labels"}``, ``expected_output`` = the right label) as ``tracing.run_experiment``
sends it and classifies the text with the same prompt and model as ``tasks.classify``.
``label_match`` scores each item, ``accuracy`` the run. ``make demo`` runs them over
``TICKETS`` with ``celery -A worker langfuse experiment`` (``worker/demo_experiment.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import shared_task
from langfuse.experiment import Evaluation

from . import prompts
from .jobs import RETRY_OPTIONS, LLMJob, match_label
from .llm import get_llm_client
from .validation import InvalidJobInput, labels_arg, text_arg

LABELS = ["billing", "technical", "account", "sales"]
TICKETS: list[dict[str, Any]] = [
    {"input": {"text": text, "labels": LABELS}, "expected_output": label,
     "metadata": {"channel": channel}}
    for text, label, channel in (
        ("I was charged twice for my subscription, please refund one payment.", "billing",
         "email"),
        ("The app crashes with an exception every time I open settings.", "technical", "chat"),
        ("I am locked out: my password reset email never arrives.", "account", "email"),
        ("Could you send a quote for 40 seats and a discount for the annual plan?", "sales",
         "web"),
        ("The invoice shows the wrong price for last month.", "billing", "chat"),
        ("Login fails and then the page shows an error.", "account", "web"),
    )
]


@shared_task(base=LLMJob, name="tasks.classify_item", **RETRY_OPTIONS)
def classify_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """Classify an experiment item's ``input["text"]`` into one of ``input["labels"]``."""
    source = item.get("input") if isinstance(item, Mapping) else None
    if not isinstance(source, Mapping):
        raise InvalidJobInput("item['input'] must be an object with 'text' and 'labels'")
    text = text_arg("text", source.get("text"))
    labels = labels_arg("labels", source.get("labels"))
    result = get_llm_client().chat(prompts.classify_messages(text, labels), name="classify",
                                   max_tokens=32)
    return {"label": match_label(result.text, labels), "answer": result.text}


def label_match(*, output: Any, expected_output: Any, **_: Any) -> Evaluation:
    """1 when the label found is the expected one, else 0 (with what was found)."""
    found = output.get("label") if isinstance(output, Mapping) else None
    return Evaluation(name="label_match", value=float(found == expected_output),
                      comment=f"expected {expected_output!r}, got {found!r}")


def accuracy(*, item_results: Any, **_: Any) -> Evaluation:
    """The share of items whose label matched."""
    values = [e.value for r in item_results for e in r.evaluations if e.name == "label_match"]
    return Evaluation(name="accuracy", value=sum(values) / len(values) if values else 0.0,
                      comment=f"{len(values)} item(s)")

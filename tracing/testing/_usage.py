"""Usage and cost details as Langfuse v4 stores them.

Mirrors langfuse/langfuse 4.16.0 (commit 6275144, the snapshot this package follows):
``packages/shared/src/server/otel/OtelIngestionProcessor.ts`` (``extractUsageDetails``,
``extractGenericGenAiUsageDetails``, ``extractCostDetails``), the ``UsageDetails`` schema in
``packages/shared/src/server/ingestion/types.ts`` (OpenAI completion / response usage →
``input``/``output``/``total``), and ``IngestionService.getUsageUnits`` /
``calculateUsageCosts`` in ``worker/src/services/IngestionService/index.ts`` (a missing
``total`` is the sum of the other keys; a provided input+output cost gets a total).

Not mirrored: tokenising input/output when no usage is provided, and costs computed from
Langfuse's model price table -- the receiver has neither.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["cost_details", "usage_details"]

A_USAGE = "langfuse.observation.usage_details"
A_COST = "langfuse.observation.cost_details"

_OPENAI_SHAPES = (
    ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
    ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
)
# extractGenericGenAiUsageDetails: gen_ai.usage.* / llm.token_count.* keys it folds.
_INPUT_KEYS = ("prompt_tokens", "input_tokens", "prompt")
_OUTPUT_KEYS = ("completion_tokens", "output_tokens", "completion")
_TOTAL_KEYS = ("total_tokens", "total")
_CACHE_READ_KEYS = (
    "cache_read.input_tokens", "cache_read_input_tokens", "cache_read_tokens",
    "details.cache_read_tokens", "details.cache_read_input_tokens",
    "prompt_details.cache_read", "input_cached_tokens",
)
_CACHE_WRITE_KEYS = (
    "cache_creation.input_tokens", "cache_creation_input_tokens", "cache_write_tokens",
    "details.cache_write_tokens", "details.cache_creation_input_tokens",
    "prompt_details.cache_write", "input_cache_creation",
)
_REASONING_KEYS = ("reasoning.output_tokens", "completion_details.reasoning")
_AUDIO_KEYS = ("completion_details.audio",)
_FOLDED = frozenset(
    _INPUT_KEYS + _OUTPUT_KEYS + _TOTAL_KEYS + _CACHE_READ_KEYS + _CACHE_WRITE_KEYS
    + _REASONING_KEYS + _AUDIO_KEYS
)


def _json_object(attributes: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """parseJsonObjectAttribute: None when absent or not JSON (fall through), {} if no object."""
    raw = attributes.get(key)
    if not raw:
        return None
    if not isinstance(raw, str):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else {}


def _int(value: Any) -> int | None:
    """A non-negative integer as zod's ``z.number().int().nonnegative()`` accepts it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value >= 0 else None


def _openai(usage: Mapping[str, Any]) -> dict[str, int] | None:
    """OpenAI completion or response usage (exact keys) → input/output/total, details split."""
    for prompt, completion, prompt_details, completion_details in _OPENAI_SHAPES:
        allowed = {prompt, completion, "total_tokens", prompt_details, completion_details}
        if set(usage) - allowed:
            continue
        prompt_n, completion_n, total_n = (
            _int(usage.get(k)) for k in (prompt, completion, "total_tokens")
        )
        if prompt_n is None or completion_n is None or total_n is None:
            continue
        result = {"input": prompt_n, "output": completion_n, "total": total_n}
        ok = True
        for details_key, prefix in ((prompt_details, "input"), (completion_details, "output")):
            details = usage.get(details_key)
            if details is None:
                continue
            if not isinstance(details, dict):
                ok = False
                break
            for key, value in details.items():
                if value is None:
                    continue
                number = _int(value)
                if number is None:
                    ok = False
                    break
                result[f"{prefix}_{key}"] = number
                result[prefix] = max(result[prefix] - number, 0)
        if ok:
            return result
    return None


def _raw(usage: Mapping[str, Any]) -> dict[str, int]:
    """RawUsageDetails: keep non-negative integers and integer strings, drop the rest."""
    out: dict[str, int] = {}
    for key, value in usage.items():
        if isinstance(value, str):
            digits = value.strip()
            sign = 1 if digits[:1] and digits[:1] in "+-" else 0
            if digits[sign:][:1].isdigit():
                end = sign
                while end < len(digits) and digits[end].isdigit():
                    end += 1
                parsed = int(digits[:end])
                if parsed >= 0:
                    out[key] = parsed
            continue
        number = _int(value)
        if number is not None:
            out[key] = number
    return out


def _first(values: Mapping[str, float], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if key in values:
            return values[key]
    return None


def _generic_gen_ai(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """gen_ai.usage.* / llm.token_count.* attributes folded into Langfuse's keys."""
    raw: dict[str, float] = {}
    for key, value in attributes.items():
        if key.startswith("gen_ai.usage.") and key != "gen_ai.usage.cost":
            name = key[len("gen_ai.usage."):]
        elif key.startswith("llm.token_count."):
            name = key[len("llm.token_count."):]
        else:
            continue
        try:
            raw[name] = float(value) if not isinstance(value, (int, float)) else value
        except (TypeError, ValueError):
            continue
    if not raw:
        return {}
    out: dict[str, Any] = {
        (k[len("details."):] if k.startswith("details.") else k): v
        for k, v in raw.items()
        if k not in _FOLDED
    }
    cache_read, cache_write = _first(raw, _CACHE_READ_KEYS), _first(raw, _CACHE_WRITE_KEYS)
    reasoning, audio = _first(raw, _REASONING_KEYS), _first(raw, _AUDIO_KEYS)
    prompt, completion = _first(raw, _INPUT_KEYS), _first(raw, _OUTPUT_KEYS)
    total = _first(raw, _TOTAL_KEYS)
    if prompt is not None:
        out["input"] = max(prompt - (cache_read or 0) - (cache_write or 0), 0)
    if completion is not None:
        out["output"] = max(completion - (reasoning or 0) - (audio or 0), 0)
    for key, value in (
        ("total", total), ("input_cached_tokens", cache_read),
        ("input_cache_creation", cache_write), ("output_reasoning_tokens", reasoning),
        ("output_audio_tokens", audio),
    ):
        if value is not None:
            out[key] = value
    return out


def usage_details(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The usage Langfuse stores for a span with these attributes."""
    if attributes.get("gen_ai.operation.name") in ("invoke_agent", "agent_step"):
        return {}  # AI SDK agent spans: their children's usage, not theirs
    provided = _json_object(attributes, A_USAGE)
    if provided is None:
        provided = _generic_gen_ai(attributes)
    usage: dict[str, Any] = _openai(provided) or _raw(provided)
    usage = {k: v for k, v in usage.items() if isinstance(v, (int, float)) and v >= 0}
    if usage and "total" not in usage:
        usage["total"] = sum(usage.values())
    return usage


def cost_details(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The provided cost Langfuse stores; a total is added for input+output only."""
    provided = _json_object(attributes, A_COST)
    if provided is None:
        for key in ("gen_ai.usage.cost", "llm.cost.total"):
            value = attributes.get(key)
            if value is not None and value != "":
                provided = {"total": value}
                break
        else:
            return {}
    cost = {k: v for k, v in provided.items() if v is not None}
    if cost and "total" not in cost and set(cost) <= {"input", "output"}:
        numbers = [v for v in cost.values() if isinstance(v, (int, float))]
        cost["total"] = sum(numbers)
    return cost

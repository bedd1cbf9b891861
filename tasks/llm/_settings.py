"""LLM settings read from the environment once, validated with errors naming the variable."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._errors import LLMConfigError

PROVIDERS = ("local", "openai")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_LOCAL_MODEL = "local-extractive-1"


@dataclass(frozen=True)
class LLMSettings:
    """Everything the LLM client needs from the environment."""

    provider: str = "local"
    model: str = DEFAULT_LOCAL_MODEL
    base_url: str = DEFAULT_OPENAI_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    stream: bool = False
    local_latency_ms: int = 5
    # USD per 1M tokens, {"model": {"input": x, "output": y}}, merged over the built-in table.
    price_overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LLMSettings:
        """Read and validate LLM_* variables from `env` (usually `os.environ`)."""
        provider = _provider(env)
        default_model = DEFAULT_OPENAI_MODEL if provider == "openai" else DEFAULT_LOCAL_MODEL
        base_url = (env.get("LLM_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        api_key = env.get("LLM_API_KEY") or env.get("OPENAI_API_KEY") or None
        if provider == "openai" and api_key is None and base_url == DEFAULT_OPENAI_BASE_URL:
            # Self-hosted OpenAI-compatible servers often need no key; api.openai.com always does.
            raise LLMConfigError(
                f"LLM_API_KEY is not set but LLM_PROVIDER=openai targets {base_url}: "
                "set LLM_API_KEY, or LLM_BASE_URL to a server that needs no key"
            )
        return cls(
            provider=provider,
            model=env.get("LLM_MODEL") or default_model,
            base_url=base_url,
            api_key=api_key,
            timeout=_positive_float(env, "LLM_TIMEOUT", 60.0),
            stream=_bool(env, "LLM_STREAM", False),
            local_latency_ms=_non_negative_int(env, "LLM_LOCAL_LATENCY_MS", 5),
            price_overrides=parse_prices_json(env.get("LLM_PRICES_JSON")),
        )


def _provider(env: Mapping[str, str]) -> str:
    raw = env.get("LLM_PROVIDER", "")
    provider = raw.strip().lower() or "local"
    if provider not in PROVIDERS:
        raise LLMConfigError(
            f"LLM_PROVIDER={raw!r} is not supported: expected one of {', '.join(PROVIDERS)}"
        )
    return provider


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise LLMConfigError(f"{name}={raw!r} is invalid: expected a number of seconds > 0")
    return value


def _non_negative_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise LLMConfigError(f"{name}={raw!r} is invalid: expected an integer >= 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise LLMConfigError(f"{name}={raw!r} is invalid: expected true or false")


def parse_prices_json(raw: str | None) -> dict[str, dict[str, float]]:
    """Parse LLM_PRICES_JSON: {"model": {"input": usd_per_1m, "output": usd_per_1m}}."""
    if raw is None or raw.strip() == "":
        return {}
    expected = 'expected a JSON object like {"my-model": {"input": 0.15, "output": 0.6}}'
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LLMConfigError(f"LLM_PRICES_JSON is not valid JSON ({exc}): {expected}") from None
    if not isinstance(data, dict):
        raise LLMConfigError(f"LLM_PRICES_JSON={raw!r} is invalid: {expected}")
    return {str(model): _price_entry(model, entry, expected) for model, entry in data.items()}


def _price_entry(model: str, entry: object, expected: str) -> dict[str, float]:
    if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
        raise LLMConfigError(f"LLM_PRICES_JSON entry {model!r} is invalid: {expected}")
    prices: dict[str, float] = {}
    for kind, value in entry.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise LLMConfigError(
                f"LLM_PRICES_JSON entry {model!r} has {kind}={value!r}: "
                "expected a USD price per 1M tokens >= 0"
            )
        prices[kind] = float(value)
    return prices

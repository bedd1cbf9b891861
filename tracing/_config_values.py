"""How one setting's value is read: a parser per kind of value.

Every parser takes the raw value and ``where`` (the source, already worded for a person:
``environment variable CELERY_LANGFUSE_JOIN``, ``app configuration CELERY_LANGFUSE_JOIN``,
``instrument() keyword join``) and returns the typed value, or raises :class:`ConfigError`
as ``{where}={value!r}: expected ...``. Text from the environment and objects from
``instrument()`` keywords or a Celery app's configuration (``False``, ``["a", "b"]``, a
compiled pattern) go through the same parser. ``None`` and blank text never reach a parser:
they mean "not set here" (see ``tracing._config``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Parser"]

Parser = Callable[[Any, str], Any]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}


class ConfigError(ValueError):
    """A configuration value is unusable; the message names its source, the value and the fix."""


def text(value: Any, where: str) -> str:
    return str(value).strip()


def flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{where}={value!r}: expected true or false (also 1/0, yes/no, on/off)")


def number(low: float | None = None, high: float | None = None) -> Parser:
    """A number, at least ``low`` and at most ``high`` where given."""

    def parse(value: Any, where: str) -> float:
        if isinstance(value, bool):  # True is an int to Python, not a number to a person
            raise ConfigError(f"{where}={value!r}: expected a number")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: expected a number") from None
        if (low is not None and result < low) or (high is not None and result > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{where}={value!r}: expected a number {bounds}")
        return result

    return parse


def size(low: int) -> Parser:
    """A size in bytes, optionally with a unit (``512KB``, ``100MB``, ``1GB``), at least ``low``."""

    def parse(value: Any, where: str) -> int:
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else ""
        if isinstance(value, bool) or not match or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{where}={value!r}: expected a size in bytes, optionally with a unit "
                "(e.g. 1048576, 512KB, 100MB, 1GB)"
            )
        result = int(match.group(1)) * _SIZE_UNITS[unit]
        if result < low:
            raise ConfigError(f"{where}={value!r}: expected at least {low} bytes")
        return result

    return parse


def http_url(value: Any, where: str) -> str:
    url = str(value).strip().rstrip("/")
    if not re.match(r"^https?://[^\s/]+", url):
        raise ConfigError(
            f"{where}={value!r}: expected an http(s) URL such as "
            "https://cloud.langfuse.com or http://localhost:3000"
        )
    return url


def directory(value: Any, where: str) -> Path:
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}={value!r}: expected a directory, but it is a file")
    return path


def handoff_url(value: Any, where: str) -> str | None:
    """A Redis URL, ``auto`` (the Celery broker when it is Redis) or ``off`` (None)."""
    given = str(value).strip()
    if given.lower() in ("auto", "off"):
        return None if given.lower() == "off" else "auto"
    if not re.match(r"^(rediss?://[^\s]*|unix:///[^\s]+)$", given):
        raise ConfigError(
            f"{where}={value!r}: expected a Redis URL (redis://host:6379/0, rediss://..., "
            "unix:///path/redis.sock), 'auto' (the Celery broker when it is Redis) or 'off'"
        )
    return given


def pattern(value: Any, where: str) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    try:
        return re.compile(str(value))
    except re.error as exc:
        raise ConfigError(
            f"{where}={value!r}: expected a regular expression matched against "
            f"argument names ({exc})"
        ) from None


def choice(*choices: str) -> Parser:
    def parse(value: Any, where: str) -> str:
        given = str(value).strip().lower()
        if given not in choices:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(choices)}")
        return given

    return parse


def names(value: Any, where: str) -> tuple[str, ...]:
    """Comma-separated text, or a list/tuple of names; globs allowed, white space not."""
    items = value.split(",") if isinstance(value, str) else list(value)
    result = tuple(str(item).strip() for item in items if str(item).strip())
    bad = [n for n in result if re.search(r"\s", n)]
    if bad:
        raise ConfigError(
            f"{where}={value!r}: expected comma-separated task names or glob patterns "
            f"(e.g. 'celery.*,tasks.ping'); {bad[0]!r} contains white space"
        )
    return result


def tracer_provider(value: Any, where: str) -> Any:
    if not callable(getattr(value, "get_tracer", None)):
        raise ConfigError(
            f"{where}={value!r}: expected an OpenTelemetry TracerProvider "
            "(opentelemetry.sdk.trace.TracerProvider)"
        )
    return value


def function(value: Any, where: str) -> Any:
    if not callable(value):
        raise ConfigError(f"{where}={value!r}: expected a function")
    return value

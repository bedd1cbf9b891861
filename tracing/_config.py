"""Configuration: one frozen object, read once from the environment, validated up front.

Langfuse's own variables keep the meaning the Langfuse SDK gives them
(``LANGFUSE_PUBLIC_KEY``, ``LANGFUSE_SECRET_KEY``, ``LANGFUSE_BASE_URL`` / ``LANGFUSE_HOST``,
``LANGFUSE_TRACING_ENVIRONMENT``, ``LANGFUSE_RELEASE``, ``LANGFUSE_SAMPLE_RATE``,
``LANGFUSE_TIMEOUT``). Ours start with ``CELERY_LANGFUSE_``. Keyword options given to
``instrument(app, **options)`` win over the environment; their names are the lower-case
variable names without the prefix (``spool_dir=...``, ``shutdown_timeout=...``).

A bad value raises :class:`ConfigError` naming the variable, the value and what is expected,
so a typo stops the worker at start-up instead of silently dropping traces.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tracing.spool import default_spool_dir

__all__ = ["Config", "ConfigError", "load_config"]

PREFIX = "CELERY_LANGFUSE_"

DEFAULT_REDACT_PATTERN = (
    r"(?i)(passw(or)?d|secret|token|api[-_]?key|authori[sz]ation|credential|private[-_]?key"
    r"|cookie|^auth$|access[-_]?key|signature)"
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the variable, value and fix."""


@dataclass(frozen=True)
class Config:
    """Everything celery-langfuse reads from the environment, validated."""

    enabled: bool = True
    public_key: str | None = None
    secret_key: str | None = None
    base_url: str = "https://cloud.langfuse.com"
    environment: str | None = None
    release: str | None = None
    sample_rate: float = 1.0
    http_timeout: float = 10.0
    traces_export_path: str | None = None  # LANGFUSE_OTEL_TRACES_EXPORT_PATH, as the SDK reads it
    spool_dir: Path = field(default_factory=default_spool_dir)
    spool_max_bytes: int = 1024**3
    # Where a stopping worker hands off what it could not ship (tracing.shipping._handoff):
    # "auto" is the Celery broker when it is Redis; None (CELERY_LANGFUSE_HANDOFF_URL=off)
    # disables it.
    handoff_url: str | None = "auto"
    shutdown_timeout: float = 5.0
    flush_interval: float = 1.0
    auth_retry_interval: float = 30.0
    capture_input: bool = True
    capture_output: bool = True
    max_payload_bytes: int = 32 * 1024
    redact_keys: re.Pattern[str] = field(default_factory=lambda: re.compile(DEFAULT_REDACT_PATTERN))
    exclude_tasks: tuple[str, ...] = ()
    join: str = "parent"  # how tasks join their producer's trace: parent / link / off
    publish_observation: bool = False  # an `enqueue <task>` child under a producer's span
    # Objects, given only as instrument() keyword options (no environment variable):
    tracer_provider: Any = None  # the OpenTelemetry TracerProvider Langfuse's spans go through
    should_export_span: Any = None  # Callable[[ReadableSpan], bool]: which spans go to Langfuse
    mask: Any = None  # Callable[..., Any]: the SDK's mask over input/output/metadata

    @property
    def has_keys(self) -> bool:
        return bool(self.public_key and self.secret_key)

    @property
    def traces_endpoint(self) -> str:
        if self.traces_export_path:
            return f"{self.base_url}/{self.traces_export_path.lstrip('/')}"
        return f"{self.base_url}/api/public/otel/v1/traces"

    def is_excluded(self, task_name: str) -> bool:
        return any(fnmatch.fnmatchcase(task_name, pattern) for pattern in self.exclude_tasks)

    def masked(self) -> dict[str, str]:
        """The settings in force, as text, with the secret key masked."""
        shown: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "secret_key" and value:
                value = value[:6] + "…" + value[-2:] if len(value) > 10 else "***"
            elif isinstance(value, re.Pattern):
                value = value.pattern
            elif isinstance(value, tuple):
                value = ",".join(value)
            shown[f.name] = "" if value is None else str(value)
        return shown


def load_config(
    environ: Mapping[str, str] | None = None, **options: Any
) -> Config:
    """Read and validate the configuration; ``options`` override the environment."""
    env = os.environ if environ is None else environ
    reader = _Reader(env, options)
    base_url = reader.text("base_url", "LANGFUSE_BASE_URL") or env.get("LANGFUSE_HOST")
    sample = reader.number("sample_rate", PREFIX + "SAMPLE_RATE", None, low=0.0, high=1.0)
    if sample is None:
        sample = reader.number("sample_rate", "LANGFUSE_SAMPLE_RATE", 1.0, low=0.0, high=1.0)
    return Config(
        enabled=reader.flag("enabled", True),
        public_key=reader.text("public_key", "LANGFUSE_PUBLIC_KEY"),
        secret_key=reader.text("secret_key", "LANGFUSE_SECRET_KEY"),
        base_url=_valid_url((base_url or "https://cloud.langfuse.com").rstrip("/")),
        environment=reader.text("environment", "LANGFUSE_TRACING_ENVIRONMENT"),
        release=reader.text("release", "LANGFUSE_RELEASE"),
        sample_rate=sample if sample is not None else 1.0,
        http_timeout=_required(reader.number("http_timeout", "LANGFUSE_TIMEOUT", 10.0, low=0.1)),
        traces_export_path=reader.text("traces_export_path", "LANGFUSE_OTEL_TRACES_EXPORT_PATH"),
        spool_dir=reader.path("spool_dir"),
        spool_max_bytes=reader.size("spool_max_bytes", 1024**3, low=64 * 1024),
        handoff_url=reader.handoff_url("handoff_url"),
        shutdown_timeout=_required(
            reader.number("shutdown_timeout", PREFIX + "SHUTDOWN_TIMEOUT", 5.0, low=0.0)
        ),
        flush_interval=_required(
            reader.number("flush_interval", PREFIX + "FLUSH_INTERVAL", 1.0, low=0.01, high=60.0)
        ),
        auth_retry_interval=_required(reader.number(
            "auth_retry_interval", PREFIX + "AUTH_RETRY_INTERVAL", 30.0, low=0.1)),
        capture_input=reader.flag("capture_input", True),
        capture_output=reader.flag("capture_output", True),
        max_payload_bytes=reader.size("max_payload_bytes", 32 * 1024, low=256),
        redact_keys=reader.pattern("redact_keys"),
        exclude_tasks=reader.names("exclude_tasks"),
        join=reader.choice("join", ("parent", "link", "off"), "parent"),
        publish_observation=reader.flag("publish_observation", False),
        tracer_provider=reader.provider("tracer_provider"),
        should_export_span=reader.callable("should_export_span"),
        mask=reader.callable("mask"),
    )


def _required(value: float | None) -> float:
    assert value is not None  # the reader returned the default
    return value


def _valid_url(url: str) -> str:
    if not re.match(r"^https?://[^\s/]+", url):
        raise ConfigError(
            f"LANGFUSE_BASE_URL={url!r}: expected an http(s) URL such as "
            "https://cloud.langfuse.com or http://localhost:3000"
        )
    return url


class _Reader:
    """Reads one option from ``options`` or its environment variable, with a clear error."""

    def __init__(self, env: Mapping[str, str], options: Mapping[str, Any]) -> None:
        unknown = set(options) - {f.name for f in fields(Config)}
        if unknown:
            raise ConfigError(
                f"instrument() got unknown option(s) {sorted(unknown)}; "
                f"known options: {sorted(f.name for f in fields(Config))}"
            )
        self._env = env
        self._options = options

    def _raw(self, name: str, variable: str) -> tuple[str, Any]:
        if name in self._options:
            return f"instrument({name}=...)", self._options[name]
        return variable, self._env.get(variable)

    def text(self, name: str, variable: str) -> str | None:
        _, value = self._raw(name, variable)
        return str(value).strip() or None if value is not None else None

    def flag(self, name: str, default: bool) -> bool:
        where, value = self._raw(name, PREFIX + name.upper())
        if value is None or isinstance(value, bool):
            return default if value is None else value
        lowered = str(value).strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{where}={value!r}: expected true or false (also 1/0, yes/no, on/off)")

    def number(
        self, name: str, variable: str, default: float | None,
        low: float | None = None, high: float | None = None,
    ) -> float | None:
        where, value = self._raw(name, variable)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: expected a number, e.g. {default}") from None
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{where}={value!r}: expected a number {bounds}")
        return number

    def size(self, name: str, default: int, low: int) -> int:
        where, value = self._raw(name, PREFIX + name.upper())
        if value is None or value == "":
            return default
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{where}={value!r}: expected a size in bytes, optionally with a unit "
                "(e.g. 1048576, 512KB, 100MB, 1GB)"
            )
        size = int(match.group(1)) * _SIZE_UNITS[unit]
        if size < low:
            raise ConfigError(f"{where}={value!r}: expected at least {low} bytes")
        return size

    def path(self, name: str) -> Path:
        where, value = self._raw(name, PREFIX + name.upper())
        if value is None or str(value).strip() == "":
            return default_spool_dir()
        path = Path(str(value)).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{where}={value!r}: expected a directory, but it is a file")
        return path

    def handoff_url(self, name: str) -> str | None:
        where, value = self._raw(name, PREFIX + name.upper())
        text = "auto" if value is None or str(value).strip() == "" else str(value).strip()
        if text.lower() in ("auto", "off"):
            return None if text.lower() == "off" else "auto"
        if not re.match(r"^(rediss?://[^\s]*|unix:///[^\s]+)$", text):
            raise ConfigError(
                f"{where}={value!r}: expected a Redis URL (redis://host:6379/0, rediss://..., "
                "unix:///path/redis.sock), 'auto' (the Celery broker when it is Redis) or 'off'"
            )
        return text

    def pattern(self, name: str) -> re.Pattern[str]:
        where, value = self._raw(name, PREFIX + name.upper())
        if value is None or str(value).strip() == "":
            return re.compile(DEFAULT_REDACT_PATTERN)
        if isinstance(value, re.Pattern):
            return value
        try:
            return re.compile(str(value))
        except re.error as exc:
            raise ConfigError(
                f"{where}={value!r}: expected a regular expression matched against "
                f"argument names ({exc})"
            ) from None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        where, value = self._raw(name, PREFIX + name.upper())
        if value is None or str(value).strip() == "":
            return default
        if str(value).strip().lower() not in choices:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(choices)}")
        return str(value).strip().lower()

    def provider(self, name: str) -> Any:
        value = self._options.get(name)
        if value is not None and not callable(getattr(value, "get_tracer", None)):
            raise ConfigError(
                f"instrument({name}={value!r}): expected an OpenTelemetry TracerProvider "
                "(opentelemetry.sdk.trace.TracerProvider)"
            )
        return value

    def callable(self, name: str) -> Any:
        value = self._options.get(name)
        if value is not None and not callable(value):
            raise ConfigError(f"instrument({name}={value!r}): expected a function")
        return value

    def names(self, name: str) -> tuple[str, ...]:
        where, value = self._raw(name, PREFIX + name.upper())
        if value is None:
            return ()
        items = value.split(",") if isinstance(value, str) else list(value)
        names = tuple(str(item).strip() for item in items if str(item).strip())
        bad = [n for n in names if re.search(r"\s", n)]
        if bad:
            raise ConfigError(
                f"{where}={value!r}: expected comma-separated task names or glob patterns "
                f"(e.g. 'celery.*,tasks.ping'); {bad[0]!r} contains white space"
            )
        return names

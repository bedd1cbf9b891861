"""Configuration: one frozen object, read once, validated up front, from four sources.

Each setting (``SETTINGS`` below: the one definition that both the parser and the table in
docs/configuration.md are made from) is looked up in this order; the first source that sets
it wins:

1. the ``instrument(app, name=...)`` keyword;
2. the Celery app's configuration, key ``langfuse_<name>`` (``app.conf.langfuse_<name>``; with
   ``config_from_object(..., namespace="CELERY")``, as Django projects load their settings,
   Celery maps ``CELERY_LANGFUSE_<NAME>`` to it);
3. the environment: ``CELERY_LANGFUSE_<NAME>`` for ours; Langfuse's own variables
   (``LANGFUSE_PUBLIC_KEY``, ``LANGFUSE_BASE_URL`` / ``LANGFUSE_HOST``, ...) keep the meaning
   the Langfuse SDK gives them;
4. the default.

``None`` and blank text mean "not set here" in every source. A bad value raises
:class:`ConfigError` naming its source (keyword, app configuration key or environment
variable), the value and what is expected; a ``langfuse_*`` key in the app's configuration
that is no setting is an error naming the nearest one, so a typo stops the worker at start-up
instead of silently changing what is traced.

``python -m tracing._config docs/configuration.md`` rewrites the table between the markers.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tracing import _config_values as parse
from tracing._config_values import ConfigError, Parser
from tracing.spool import default_spool_dir

__all__ = [
    "SETTINGS", "Config", "ConfigError", "Setting", "configuration_table", "load_config",
    "setting_sources",
]

PREFIX = "CELERY_LANGFUSE_"
APP_PREFIX = "langfuse_"

DEFAULT_REDACT_PATTERN = (
    r"(?i)(passw(or)?d|secret|token|api[-_]?key|authori[sz]ation|credential|private[-_]?key"
    r"|cookie|^auth$|access[-_]?key|signature)"
)


@dataclass(frozen=True)
class Config:
    """Every setting in force, validated; the fields are the ``SETTINGS`` below, one for one."""

    enabled: bool = True
    public_key: str | None = None
    secret_key: str | None = None
    base_url: str = "https://cloud.langfuse.com"
    environment: str | None = None
    release: str | None = None
    sample_rate: float = 1.0
    http_timeout: float = 5.0  # LANGFUSE_TIMEOUT; the SDK's default too (langfuse 5.x)
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
    # Objects, given only in Python (a keyword, or the app's configuration):
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


@dataclass(frozen=True)
class Setting:
    """One setting: its name, the variables it is read from, its parser and its documentation.

    ``name`` is the ``instrument()`` keyword and the ``Config`` field; the app's configuration
    key is ``langfuse_<name>``. ``env`` lists environment variables, the first one set wins
    (empty: objects, given only in Python). The default is the ``Config`` field's.
    """

    name: str
    parse: Parser
    default: str  # the default, as the documentation shows it
    doc: str
    env: tuple[str, ...] = ()

    @property
    def app_key(self) -> str:
        return APP_PREFIX + self.name


def _ours(name: str, parser: Parser, default: str, doc: str) -> Setting:
    return Setting(name, parser, default, doc, (PREFIX + name.upper(),))


SETTINGS: tuple[Setting, ...] = (
    # Langfuse's own variables, read as the Langfuse SDK reads them
    Setting("public_key", parse.text, "(none)", "Langfuse project public key (`pk-lf-...`); "
            "without both keys tasks run untraced", ("LANGFUSE_PUBLIC_KEY",)),
    Setting("secret_key", parse.text, "(none)", "Langfuse project secret key (`sk-lf-...`); "
            "shown masked", ("LANGFUSE_SECRET_KEY",)),
    Setting("base_url", parse.http_url, "`https://cloud.langfuse.com`",
            "the Langfuse server", ("LANGFUSE_BASE_URL", "LANGFUSE_HOST")),
    Setting("environment", parse.text, "(none)", "the Langfuse environment of every trace",
            ("LANGFUSE_TRACING_ENVIRONMENT",)),
    Setting("release", parse.text, "(none)", "the release recorded on every trace",
            ("LANGFUSE_RELEASE",)),
    Setting("sample_rate", parse.number(0.0, 1.0), "`1.0`", "fraction of traces kept",
            (PREFIX + "SAMPLE_RATE", "LANGFUSE_SAMPLE_RATE")),
    Setting("http_timeout", parse.number(low=0.1), "`5`",
            "seconds one request to Langfuse may take (the SDK's default too); while Langfuse "
            "answers later, the shipper waits four times as long", ("LANGFUSE_TIMEOUT",)),
    Setting("traces_export_path", parse.text, "`/api/public/otel/v1/traces`",
            "where spans are posted, a path under the base URL (as the SDK reads it)",
            ("LANGFUSE_OTEL_TRACES_EXPORT_PATH",)),
    # ours
    _ours("enabled", parse.flag, "`true`", "`false` turns tracing off quietly"),
    _ours("spool_dir", parse.directory, "`~/.local/state/celery-langfuse/spool`",
          "the spool directory (per host; `$XDG_STATE_HOME` is honoured)"),
    _ours("spool_max_bytes", parse.size(low=64 * 1024), "`1GB`",
          "unshipped bytes kept at most; past it the oldest are dropped and counted"),
    _ours("handoff_url", parse.handoff_url, "`auto`",
          "Redis URL where a stopping worker hands off what it could not ship; `auto`: the "
          "Celery broker when it is Redis; `off`"),
    _ours("shutdown_timeout", parse.number(low=0.0), "`5`",
          "seconds for the last shipping attempt at worker shutdown"),
    _ours("flush_interval", parse.number(0.01, 60.0), "`1`",
          "the Langfuse client's flush interval; spans do not wait for it: each is in "
          "the spool when it ends"),
    _ours("auth_retry_interval", parse.number(low=0.1), "`30`",
          "seconds between retries after Langfuse answers 401/403"),
    _ours("capture_input", parse.flag, "`true`", "record task args/kwargs as the input"),
    _ours("capture_output", parse.flag, "`true`", "record task results as the output"),
    _ours("max_payload_bytes", parse.size(low=256), "`32KB`",
          "cap on each rendered input/output"),
    _ours("redact_keys", parse.pattern, "password, secret, token, api key, authorization, ...",
          "regular expression over argument/key names whose values are redacted"),
    _ours("exclude_tasks", parse.names, "(none)",
          "task names or globs never traced (comma-separated, or a list)"),
    _ours("join", parse.choice("parent", "link", "off"), "`parent`",
          "how tasks join their sender's trace: `parent`, `link`, `off`"),
    _ours("publish_observation", parse.flag, "`false`",
          "record `enqueue <task>` under a producer's observation"),
    # objects: Python only (a keyword, or the app's configuration in a Python settings module)
    Setting("tracer_provider", parse.tracer_provider, "Langfuse's own",
            "an OpenTelemetry `TracerProvider` for Langfuse's spans"),
    Setting("should_export_span", parse.function, "the SDK's filter",
            "a function of a span: whether it goes to Langfuse"),
    Setting("mask", parse.function, "(none)",
            "a function applied to task input/output and by the SDK to every span"),
)
_BY_NAME = {setting.name: setting for setting in SETTINGS}


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    app_config: Mapping[str, Any] | None = None,
    **options: Any,
) -> Config:
    """Read and validate the configuration: ``options`` (``instrument()`` keywords), then
    ``app_config`` (a Celery app's ``app.conf``), then ``environ`` (default ``os.environ``)."""
    found = _found(environ, app_config, options)
    return Config(**{name: _BY_NAME[name].parse(raw, where)
                     for name, (where, raw) in found.items()})


def setting_sources(
    environ: Mapping[str, str] | None = None,
    *,
    app_config: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, str]:
    """Where each setting comes from, as ``load_config`` reads it (``"default"`` when unset):
    what ``status`` shows, so "why is input captured?" has an answer."""
    found = _found(environ, app_config, options)
    return {s.name: found[s.name][0] if s.name in found else "default" for s in SETTINGS}


def _found(
    environ: Mapping[str, str] | None, app_config: Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> dict[str, tuple[str, Any]]:
    """``{name: (where, raw value)}`` for every setting some source sets."""
    env = os.environ if environ is None else environ
    unknown = sorted(set(options) - set(_BY_NAME))
    if unknown:
        near = _closest(unknown[0])
        raise ConfigError(
            f"instrument() got unknown option {unknown[0]!r}"
            + (f"; did you mean {near!r}?" if near else "")
            + f"; the options are: {', '.join(_BY_NAME)}"
        )
    from_app = app_settings(app_config) if app_config is not None else {}
    found: dict[str, tuple[str, Any]] = {}
    for setting in SETTINGS:
        first = _first_set(setting, options, from_app, env)
        if first is not None:
            found[setting.name] = first
    return found


def _is_set(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _first_set(
    setting: Setting, options: Mapping[str, Any], from_app: Mapping[str, tuple[str, Any]],
    env: Mapping[str, str],
) -> tuple[str, Any] | None:
    """(where, raw value) from the first source that sets ``setting``, or None."""
    if _is_set(options.get(setting.name)):
        return f"instrument() keyword {setting.name}", options[setting.name]
    key, value = from_app.get(setting.name, ("", None))
    if _is_set(value):
        return f"app configuration {key}", value
    for variable in setting.env:
        if _is_set(env.get(variable)):
            return f"environment variable {variable}", env[variable]
    return None


def app_settings(conf: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{name: (key as written, value)}`` for every ``langfuse_*`` key of a Celery app's
    configuration; a ``langfuse_*`` key that is no setting raises :class:`ConfigError`.

    Celery's ``Settings`` with a namespace (``prefix`` ``CELERY_``) finds ``langfuse_x`` as
    ``CELERY_LANGFUSE_X`` first, then as ``langfuse_x``: both forms are read, in that order.
    """
    keys = list(conf.keys())  # first: this loads a Celery app's pending configuration
    prefix = getattr(conf, "prefix", None) or ""
    prefixed = prefix + (APP_PREFIX.upper() if prefix.isupper() else APP_PREFIX)
    found: dict[str, tuple[str, Any]] = {}
    for key in keys:
        if not isinstance(key, str):
            continue
        if prefix and key.startswith(prefixed):
            name, spelled = key[len(prefixed):].lower(), prefixed
        elif key.startswith(APP_PREFIX):
            name, spelled = key[len(APP_PREFIX):], APP_PREFIX
            if name in found:  # the namespaced key wins, as in Celery's own lookup
                continue
        else:
            continue
        if name not in _BY_NAME:
            near = _closest(name)
            spelling = f"{spelled}{near.upper() if spelled.isupper() else near}" if near else ""
            raise ConfigError(
                f"app configuration {key}: not a celery-langfuse setting"
                + (f"; did you mean {spelling}?" if near else "")
                + " (every setting: docs/configuration.md)"
            )
        found[name] = (key, conf[key])
    return found


def _closest(name: str) -> str | None:
    """The setting name nearest to a misspelt one (difflib), or None."""
    close = difflib.get_close_matches(name.lower(), list(_BY_NAME), n=1, cutoff=0.6)
    return close[0] if close else None


TABLE_BEGIN = ("<!-- settings table: made from tracing/_config.py by "
               "`python -m tracing._config docs/configuration.md`; do not edit by hand -->")
TABLE_END = "<!-- end of settings table -->"


def configuration_table() -> str:
    """The documentation table of ``SETTINGS`` (Markdown), as docs/configuration.md holds it."""
    rows = [
        "| `instrument()` keyword | app configuration / Django settings | environment "
        "| default | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        env = " or ".join(f"`{v}`" for v in s.env) or "(Python only)"
        app = f"`{s.app_key}` / `CELERY_{s.app_key.upper()}`"
        rows.append(f"| `{s.name}` | {app} | {env} | {s.default} | {s.doc} |")
    return "\n".join(rows) + "\n"


def with_table(document: str) -> str:
    """``document`` with the text between the table markers replaced by the current table."""
    begin, end = document.find(TABLE_BEGIN), document.find(TABLE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no table markers ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    head = document[: begin + len(TABLE_BEGIN)]
    return f"{head}\n{configuration_table()}{document[end:]}"


if __name__ == "__main__":  # pragma: no cover
    for name in sys.argv[1:] or ["docs/configuration.md"]:
        target = Path(name)
        target.write_text(with_table(target.read_text()))
        print(f"wrote the settings table into {target}")

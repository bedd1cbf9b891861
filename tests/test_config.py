"""Configuration: one frozen object, and a clear error for every kind of mistake."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from celery import Celery

import tracing
from tracing import ConfigError, load_config


def test_defaults_without_environment():
    """With nothing set, tracing is enabled but has no keys, and the defaults are sane."""
    config = load_config(environ={})
    assert config.enabled and not config.has_keys
    assert config.base_url == "https://cloud.langfuse.com"
    assert config.shutdown_timeout == 5.0 and config.capture_input and config.capture_output


def test_config_is_frozen():
    """The configuration cannot be changed after it is read."""
    config = load_config(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enabled = False  # type: ignore[misc]


def test_langfuse_variables_keep_their_meaning():
    """LANGFUSE_* variables are read as the Langfuse SDK reads them."""
    config = load_config(environ={
        "LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk",
        "LANGFUSE_HOST": "http://localhost:3000/", "LANGFUSE_SAMPLE_RATE": "0.25",
        "LANGFUSE_TRACING_ENVIRONMENT": "staging", "LANGFUSE_RELEASE": "v1",
    })
    assert config.has_keys and config.base_url == "http://localhost:3000"
    assert config.sample_rate == 0.25 and config.environment == "staging"
    assert config.traces_endpoint == "http://localhost:3000/api/public/otel/v1/traces"


def test_options_override_environment(tmp_path: Path):
    """Keyword options to instrument() win over the environment."""
    config = load_config(environ={"CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "9"},
                         shutdown_timeout=2, spool_dir=str(tmp_path))
    assert config.shutdown_timeout == 2 and config.spool_dir == tmp_path


def test_sizes_accept_units():
    """Byte sizes accept plain numbers and K/M/G units."""
    config = load_config(environ={"CELERY_LANGFUSE_SPOOL_MAX_BYTES": "100MB",
                                  "CELERY_LANGFUSE_MAX_PAYLOAD_BYTES": "4k"})
    assert config.spool_max_bytes == 100 * 1024**2 and config.max_payload_bytes == 4096


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("CELERY_LANGFUSE_ENABLED", "maybe", "expected true or false"),
    ("CELERY_LANGFUSE_SHUTDOWN_TIMEOUT", "soon", "expected a number"),
    ("CELERY_LANGFUSE_SHUTDOWN_TIMEOUT", "-1", "at least 0"),
    ("CELERY_LANGFUSE_SAMPLE_RATE", "2", "between 0.0 and 1.0"),
    ("LANGFUSE_SAMPLE_RATE", "half", "expected a number"),
    ("CELERY_LANGFUSE_SPOOL_MAX_BYTES", "lots", "expected a size in bytes"),
    ("CELERY_LANGFUSE_SPOOL_MAX_BYTES", "10", "at least"),
    ("CELERY_LANGFUSE_MAX_PAYLOAD_BYTES", "5 parsecs", "expected a size"),
    ("CELERY_LANGFUSE_REDACT_KEYS", "(unclosed", "regular expression"),
    ("CELERY_LANGFUSE_EXCLUDE_TASKS", "tasks.a, tasks b", "white space"),
    ("LANGFUSE_BASE_URL", "localhost:3000", "http(s) URL"),
    ("CELERY_LANGFUSE_FLUSH_INTERVAL", "0", "between"),
])
def test_bad_values_name_variable_value_and_expectation(variable, value, expected):
    """Each kind of bad value raises ConfigError naming the variable, value and fix."""
    with pytest.raises(ConfigError) as error:
        load_config(environ={variable: value})
    message = str(error.value)
    assert variable in message and repr(value) in message and expected in message


def test_spool_dir_that_is_a_file(tmp_path: Path):
    """A spool path that is a regular file is refused at configuration time."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"CELERY_LANGFUSE_SPOOL_DIR.*is a file"):
        load_config(environ={"CELERY_LANGFUSE_SPOOL_DIR": str(a_file)})


def test_unknown_instrument_option():
    """A misspelt instrument() option is an error listing the known ones."""
    with pytest.raises(ConfigError, match=r"unknown option.*shutdown_timout"):
        load_config(environ={}, shutdown_timout=3)


def test_exclude_tasks_globs():
    """Excluded task names may be globs."""
    config = load_config(environ={"CELERY_LANGFUSE_EXCLUDE_TASKS": "celery.*,tasks.ping"})
    assert config.is_excluded("celery.backend_cleanup") and config.is_excluded("tasks.ping")
    assert not config.is_excluded("tasks.summarize")


def test_no_keys_warns_once_in_the_worker_naming_the_variables(monkeypatch, caplog):
    """Without keys a worker warns once, naming the variables; a producer stays quiet."""
    from celery import signals

    for name in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    app = Celery("no-keys")
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        tracing.instrument(app)
        tracing.instrument(app)
        assert caplog.text == ""  # importing the app module (a producer) says nothing
        signals.worker_init.send(sender=None)
    assert caplog.text.count("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY") == 1
    tracing.uninstrument(app)


def test_disabled_is_quiet(monkeypatch, caplog):
    """CELERY_LANGFUSE_ENABLED=false turns tracing off without a warning."""
    monkeypatch.setenv("CELERY_LANGFUSE_ENABLED", "false")
    app = Celery("disabled")
    with caplog.at_level(logging.WARNING, logger="celery_langfuse"):
        config = tracing.instrument(app)
    assert not config.enabled and caplog.text == ""
    tracing.uninstrument(app)


def test_instrument_is_idempotent_and_undone(monkeypatch):
    """instrument() twice connects once; uninstrument() disconnects."""
    from celery import signals

    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk")
    app = Celery("twice")
    tracing.instrument(app)
    tracing.instrument(app)
    uids = [r[0][0] for r in signals.task_prerun.receivers]
    assert uids.count("celery_langfuse.on_task_prerun") == 1
    assert tracing.is_instrumented(app)
    tracing.uninstrument(app)
    assert "celery_langfuse.on_task_prerun" not in [r[0][0] for r in signals.task_prerun.receivers]


def test_bad_config_at_instrument_raises(monkeypatch):
    """instrument() validates up front: a bad value stops start-up with the reason."""
    monkeypatch.setenv("CELERY_LANGFUSE_CAPTURE_INPUT", "sometimes")
    with pytest.raises(ConfigError, match="CELERY_LANGFUSE_CAPTURE_INPUT"):
        tracing.instrument(Celery("bad"))


def test_traces_export_path_moves_the_endpoint_like_the_sdk():
    """LANGFUSE_OTEL_TRACES_EXPORT_PATH is a path under the base URL, as the SDK reads it."""
    config = load_config({"LANGFUSE_BASE_URL": "https://lf.example/prefix",
                          "LANGFUSE_OTEL_TRACES_EXPORT_PATH": "/custom/v1/traces"})
    assert config.traces_endpoint == "https://lf.example/prefix/custom/v1/traces"
    assert load_config({}).traces_endpoint.endswith("/api/public/otel/v1/traces")


def test_object_options_pass_through_and_are_checked():
    """tracer_provider, should_export_span and mask are taken from instrument() keywords, and
    a wrong kind of object is refused with the option's name."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    config = load_config({}, tracer_provider=provider, should_export_span=lambda s: True,
                         mask=lambda data: data)
    assert config.tracer_provider is provider and callable(config.mask)
    with pytest.raises(ConfigError, match=r"tracer_provider=.*TracerProvider"):
        load_config({}, tracer_provider="not a provider")
    with pytest.raises(ConfigError, match=r"mask=.*expected a function"):
        load_config({}, mask=3)


def test_mask_is_applied_to_task_input_before_rendering(monkeypatch):
    """A user's mask sees the task's input first; what it returns is what is rendered."""
    from types import SimpleNamespace

    from tracing.instrumentation import _runtime
    from tracing.instrumentation._task_common import render

    config = load_config({}, mask=lambda data: {"masked": True})
    monkeypatch.setattr(_runtime, "current", lambda: SimpleNamespace(config=config))
    assert render({"kwargs": {"email": "a@b.c"}}) == '{"masked":true}'

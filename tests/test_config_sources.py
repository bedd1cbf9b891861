"""Where settings come from: instrument() keywords > the Celery app's configuration >
environment > default, the errors that name the source, and the documentation table."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from celery import Celery

import tracing
from tests.support import ROOT
from tracing import ConfigError, load_config
from tracing._config import SETTINGS, TABLE_BEGIN, TABLE_END, Config, configuration_table


@pytest.fixture
def settings_module() -> Iterator[types.ModuleType]:
    """An importable Django-style settings module (upper-case names), removed afterwards."""
    name = f"settings_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    module.DEBUG = True  # type: ignore[attr-defined]
    sys.modules[name] = module
    yield module
    del sys.modules[name]


def django_app(module: types.ModuleType) -> Celery:
    app = Celery(f"dj-{uuid.uuid4().hex[:6]}")
    app.config_from_object(module.__name__, namespace="CELERY")
    return app


def test_precedence_keyword_then_app_then_environment_then_default(settings_module):
    """One rule for every setting: keyword beats the app's configuration, which beats the
    environment, which beats the default."""
    settings_module.CELERY_LANGFUSE_SHUTDOWN_TIMEOUT = 7  # type: ignore[attr-defined]
    settings_module.CELERY_LANGFUSE_CAPTURE_INPUT = False  # type: ignore[attr-defined]
    conf = django_app(settings_module).conf
    env = {"CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "9", "CELERY_LANGFUSE_CAPTURE_INPUT": "true",
           "CELERY_LANGFUSE_FLUSH_INTERVAL": "0.5"}
    config = load_config(env, app_config=conf, shutdown_timeout=3)
    assert config.shutdown_timeout == 3.0  # keyword > app configuration > environment
    assert config.capture_input is False  # app configuration > environment
    assert config.flush_interval == 0.5  # environment > default
    assert config.auth_retry_interval == 30.0  # default
    assert load_config(env, app_config=conf).shutdown_timeout == 7.0


def test_langfuse_own_settings_from_django_settings(settings_module):
    """Langfuse's keys and host can live in settings.py too (CELERY_LANGFUSE_PUBLIC_KEY ...),
    beating LANGFUSE_* variables; lists and booleans are taken as Python values."""
    settings_module.CELERY_LANGFUSE_PUBLIC_KEY = "pk-lf-django"  # type: ignore[attr-defined]
    settings_module.CELERY_LANGFUSE_SECRET_KEY = "sk-lf-django"  # type: ignore[attr-defined]
    settings_module.CELERY_LANGFUSE_BASE_URL = "http://langfuse.internal:3000/"  # type: ignore[attr-defined]
    settings_module.CELERY_LANGFUSE_EXCLUDE_TASKS = ["celery.*", "app.ping"]  # type: ignore[attr-defined]
    config = load_config({"LANGFUSE_PUBLIC_KEY": "pk-env", "LANGFUSE_HOST": "http://env:1"},
                         app_config=django_app(settings_module).conf)
    assert config.public_key == "pk-lf-django" and config.has_keys
    assert config.base_url == "http://langfuse.internal:3000"
    assert config.exclude_tasks == ("celery.*", "app.ping")


def test_lower_case_keys_of_a_plain_celery_app():
    """Without a namespace, app.conf.update(langfuse_<name>=...) is read; None means unset."""
    app = Celery("plain")
    app.conf.update(langfuse_join="link", langfuse_max_payload_bytes="4KB",
                    langfuse_release=None)
    config = load_config({"LANGFUSE_RELEASE": "v9"}, app_config=app.conf)
    assert config.join == "link" and config.max_payload_bytes == 4096
    assert config.release == "v9"


def test_unknown_app_key_names_it_and_the_nearest_setting(settings_module):
    """A misspelt CELERY_LANGFUSE_* key is an error naming the key as written and the
    nearest valid one, in the same spelling."""
    settings_module.CELERY_LANGFUSE_CAPTUER_INPUT = False  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as error:
        tracing.instrument(django_app(settings_module))
    message = str(error.value)
    assert "CELERY_LANGFUSE_CAPTUER_INPUT" in message
    assert "did you mean CELERY_LANGFUSE_CAPTURE_INPUT?" in message
    app = Celery("lower")
    app.conf.update(langfuse_spool_max_byte="1GB")
    with pytest.raises(ConfigError, match=r"langfuse_spool_max_byte: .*did you mean "
                                          r"langfuse_spool_max_bytes\?"):
        load_config({}, app_config=app.conf)


def test_unknown_keyword_names_the_nearest_option():
    """A misspelt instrument() keyword names the nearest option."""
    with pytest.raises(ConfigError, match="'capture_ouput'; did you mean 'capture_output'"):
        load_config({}, capture_ouput=False)


@pytest.mark.parametrize(("source", "expected"), [
    ("keyword", "instrument() keyword shutdown_timeout='soon'"),
    ("app", "app configuration CELERY_LANGFUSE_SHUTDOWN_TIMEOUT='soon'"),
    ("env", "environment variable CELERY_LANGFUSE_SHUTDOWN_TIMEOUT='soon'"),
])
def test_bad_value_names_its_source(settings_module, source, expected):
    """A bad value's error says whether it came from a keyword, the app's configuration
    (with the key as written) or an environment variable."""
    options = {"shutdown_timeout": "soon"} if source == "keyword" else {}
    if source == "app":
        settings_module.CELERY_LANGFUSE_SHUTDOWN_TIMEOUT = "soon"  # type: ignore[attr-defined]
    env = {"CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "soon" if source == "env" else "1"}
    with pytest.raises(ConfigError) as error:
        load_config(env, app_config=django_app(settings_module).conf, **options)
    assert str(error.value).startswith(expected), str(error.value)
    assert "expected a number" in str(error.value)


def test_configuration_loaded_after_instrument_is_read_again(settings_module, caplog):
    """instrument() before config_from_object: the settings are read again when Celery loads
    the configuration; a bad value then turns tracing off with one error naming it."""
    from tracing.instrumentation import _instrument

    settings_module.CELERY_LANGFUSE_CAPTURE_OUTPUT = False  # type: ignore[attr-defined]
    app = Celery("late")
    try:
        assert tracing.instrument(app).capture_output is True
        app.config_from_object(settings_module.__name__, namespace="CELERY")
        assert _instrument._config is not None and _instrument._config.capture_output is False
        settings_module.CELERY_LANGFUSE_CAPTURE_OUTPUT = "rarely"  # type: ignore[attr-defined]
        with caplog.at_level(logging.ERROR, logger="celery_langfuse"):
            app.config_from_object(settings_module.__name__, namespace="CELERY", force=True)
        assert _instrument._config is not None and not _instrument._config.enabled
        assert "CELERY_LANGFUSE_CAPTURE_OUTPUT='rarely'" in caplog.text
    finally:
        tracing.uninstrument(app)


def test_every_config_field_is_one_setting():
    """SETTINGS and Config's fields are the same names, so nothing is read but undocumented."""
    assert sorted(s.name for s in SETTINGS) == sorted(f.name for f in fields(Config))
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)


def test_documentation_table_matches_the_code():
    """docs/configuration.md holds exactly the table made from SETTINGS (regenerate it with
    `python -m tracing._config docs/configuration.md`)."""
    document = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = document.index(TABLE_BEGIN) + len(TABLE_BEGIN), document.index(TABLE_END)
    assert document[begin:end].strip() == configuration_table().strip(), (
        "docs/configuration.md is out of date: run "
        "`.venv/bin/python -m tracing._config docs/configuration.md`"
    )
    for setting in SETTINGS:
        for variable in setting.env:
            assert f"`{variable}`" in document


def test_celery_subcommand_reads_the_apps_settings(tmp_path: Path):
    """`celery -A app langfuse status` shows the settings from the app's Django-style
    configuration, as the worker reads them, and which source set each one."""
    env = {**os.environ, "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path / "spool"),
           "CELERY_LANGFUSE_CAPTURE_INPUT": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.django_style_app", "langfuse",
         "status", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    shown = report["configuration"]
    assert shown["capture_input"] == "False" and shown["exclude_tasks"] == "dj.excluded"
    assert report["set by"]["capture_input"] == "app configuration CELERY_LANGFUSE_CAPTURE_INPUT"
    assert report["set by"]["spool_dir"] == "environment variable CELERY_LANGFUSE_SPOOL_DIR"
    assert "join" not in report["set by"]  # a default


def test_real_django_project_settings(tmp_path: Path):
    """A real Django project (django.conf:settings, namespace="CELERY"): its
    CELERY_LANGFUSE_* settings beat the environment, and a misspelt one stops instrument()
    naming the nearest setting. In a fresh interpreter: Django's settings are process-wide."""
    pytest.importorskip("django")
    probe = ("import json; from tests.apps.django_project.celery import config as c; "
             "print(json.dumps([c.capture_input, c.spool_max_bytes, list(c.exclude_tasks)]))")
    env = {**os.environ, "CELERY_LANGFUSE_CAPTURE_INPUT": "true",
           "DJANGO_SETTINGS_MODULE": "tests.apps.django_project.settings"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, 100 * 1024**2, ["celery.*"]]
    typo = tmp_path / "typo_settings.py"
    typo.write_text((ROOT / "tests/apps/django_project/settings.py").read_text()
                    + "CELERY_LANGFUSE_CAPTURE_INPT = True\n")
    env = {**env, "DJANGO_SETTINGS_MODULE": "typo_settings",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60)
    assert out.returncode != 0
    assert ("app configuration CELERY_LANGFUSE_CAPTURE_INPT: not a celery-langfuse setting; "
            "did you mean CELERY_LANGFUSE_CAPTURE_INPUT?") in out.stderr


@pytest.mark.slow
def test_django_style_setting_honoured_by_a_real_worker(start_worker, worker_env, receiver):
    """A real worker of an app configured from a settings module with namespace="CELERY":
    CELERY_LANGFUSE_CAPTURE_INPUT = False keeps the task's input out of Langfuse (even with
    the environment saying true) while its output arrives; an excluded task is not traced."""
    worker = start_worker("tests.apps.django_style_app",
                          env={"CELERY_LANGFUSE_CAPTURE_INPUT": "true"})
    producer = Celery(broker=worker_env["CELERY_BROKER_URL"],
                      backend=worker_env["CELERY_RESULT_BACKEND"])
    queue = worker_env["TEST_QUEUE"]
    try:
        assert producer.send_task("dj.excluded", queue=queue).get(timeout=60) == "not traced"
        result = producer.send_task("dj.private", queue=queue,
                                    kwargs={"email": "ann@example.com", "note": "a private note"})
        assert result.get(timeout=60) == {"stored": 14}
        observations = receiver.wait_for(
            lambda obs: any(o.name == "dj.private" for o in obs), timeout=30,
            what="the dj.private task's observation")
    finally:
        producer.close()
    [task] = [o for o in observations if o.name == "dj.private"]
    assert task.input is None, task.input
    assert task.output is not None and "14" in json.dumps(task.output)
    assert "ann@example.com" not in json.dumps([o.input for o in observations], default=str)
    assert [o.name for o in observations if o.name == "dj.excluded"] == []
    assert worker.stop() == 0

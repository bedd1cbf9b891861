"""``instrument(app)``: connect the tracing handlers to Celery's signals, once.

Called at import time in the app module, it only validates the configuration and connects
handlers; nothing is started until the process becomes a worker (``worker_init``), so a web
service that imports the same app module to enqueue tasks gets header propagation and no
spool. Celery's signals are process-global: the handlers are connected once (by
``dispatch_uid``) and act for every instrumented app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from tracing._config import Config, ConfigError, load_config
from tracing.instrumentation import _runtime
from tracing.instrumentation._beat import connect_beat_handler
from tracing.instrumentation._eager import after_eager_postrun, on_eager_postrun, on_eager_prerun
from tracing.instrumentation._propagation import (
    connect_publish_handler,
    disconnect_publish_handler,
    record_publishes,
)
from tracing.instrumentation._redelivery import on_task_received
from tracing.instrumentation._task_common import never_raises
from tracing.instrumentation._task_elsewhere import (
    on_task_rejected,
    on_task_revoked,
    on_task_unknown,
)
from tracing.instrumentation._task_tracing import (
    on_task_failure,
    on_task_internal_error,
    on_task_postrun,
    on_task_prerun,
    on_task_retry,
)
from tracing.spool import SpoolError

logger = logging.getLogger("celery_langfuse")

_apps: dict[int, Celery] = {}
_options: dict[int, dict[str, Any]] = {}  # each app's instrument() keywords
_config: Config | None = None


def instrument(app: Celery, **options: Any) -> Config:
    """Trace every task of ``app`` into Langfuse, losing nothing when a worker exits.

    Settings come from ``options``, then the app's configuration (``langfuse_<name>``; Django:
    ``CELERY_LANGFUSE_<NAME>``), then the environment (see ``tracing._config``); a bad value
    raises ``ConfigError``. Reading ``app.conf`` finalises Celery's configuration as any read
    does; if the app loads its configuration again later (``config_from_object`` after this
    call), the settings are read again. Idempotent. Returns the configuration in force.
    """
    from tracing.instrumentation import _remote  # noqa: F401  (registers the remote control commands)

    config = load_config(app_config=app.conf, **options)
    _apps[id(app)] = app
    _options[id(app)] = options
    app.on_after_configure.connect(_reader_for(app), weak=False,
                                   dispatch_uid="celery_langfuse.reconfigured")
    return _apply(config)


def _apply(config: Config) -> Config:
    """Make ``config`` the one in force: connect or disconnect the handlers it asks for."""
    global _config
    _config = config
    connect_publish_handler()
    record_publishes(config.publish_observation, config.public_key)
    connect_beat_handler()
    if not config.enabled:
        _disconnect_worker_handlers()
        return config
    if not config.has_keys:
        # Only a worker runs tasks: a producer importing the same app module needs no keys,
        # so the warning waits for worker_init rather than being printed at import time.
        _disconnect_worker_handlers()
        signals.worker_init.connect(_warn_untraced, weak=False,
                                    dispatch_uid="celery_langfuse._warn_untraced")
        return config
    _connect_worker_handlers()
    return config


def _reader_for(app: Celery) -> Callable[..., None]:
    """A receiver of ``app.on_after_configure`` (the app's configuration loaded again) that
    reads the settings again; Celery swallows a receiver's exception, so a bad value there is
    logged and turns tracing off rather than tracing with settings the user did not ask for."""

    def reread(sender: Any = None, source: Any = None, **_: Any) -> None:
        if sender is not app or id(app) not in _apps:
            return
        try:
            config = load_config(app_config=source if source is not None else app.conf,
                                 **_options.get(id(app), {}))
        except ConfigError as exc:
            logger.error("celery-langfuse: %s. Tracing is off until this is fixed.", exc)
            config = Config(enabled=False)
        _apply(config)

    return reread


def uninstrument(app: Celery) -> None:
    """Undo :func:`instrument` for ``app``; with no app left, disconnect every handler."""
    _apps.pop(id(app), None)
    _options.pop(id(app), None)
    if not _apps:
        _disconnect_worker_handlers()
        disconnect_publish_handler()


def is_instrumented(app: Celery) -> bool:
    return id(app) in _apps


# In this order: Celery calls a signal's receivers in the order they were connected, and the
# eager handlers (tasks run in a process that is not a worker, _eager) prepare an attempt
# before _task_tracing opens it and wake the shipper after it ends. A worker disconnects them
# at worker_init: three receivers cost its every task ~2 µs.
_EAGER_HANDLERS = (on_eager_prerun, on_eager_postrun, after_eager_postrun)
_TASK_SIGNALS: list[tuple[Any, Callable[..., Any]]] = [
    (signals.task_prerun, on_eager_prerun),
    (signals.task_prerun, on_task_prerun),
    (signals.task_postrun, on_eager_postrun),
    (signals.task_postrun, on_task_postrun),
    (signals.task_postrun, after_eager_postrun),
    (signals.task_failure, on_task_failure),
    (signals.task_retry, on_task_retry),
    (signals.task_internal_error, on_task_internal_error),
    (signals.task_revoked, on_task_revoked),
    (signals.task_rejected, on_task_rejected),
    (signals.task_unknown, on_task_unknown),
    (signals.task_received, on_task_received),
]


def _warn_untraced(**_: Any) -> None:
    logger.warning(
        "celery-langfuse: LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY are not set; tasks run "
        "untraced. Set them (and LANGFUSE_BASE_URL) to trace, or set "
        "CELERY_LANGFUSE_ENABLED=false to silence this warning."
    )


@never_raises
def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool forks: spool, Langfuse client, shipper."""
    if _config is None or not _belongs(sender):
        return
    for signal, handler in _TASK_SIGNALS:
        if handler in _EAGER_HANDLERS:  # inherited by the pool children
            signal.disconnect(dispatch_uid=f"celery_langfuse.{handler.__name__}")
    try:
        _runtime.start(_config)
    except SpoolError as exc:
        logger.error("celery-langfuse: %s. Tasks run untraced until this is fixed.", exc)


@never_raises
def on_worker_process_shutdown(**_: Any) -> None:
    """Pool child leaving (it ends in os._exit, skipping atexit): spans to the spool."""
    runtime = _runtime.current()
    if runtime is not None:
        runtime.flush()


@never_raises
def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    """Main process: flush, then one last shipping attempt bounded by the shutdown timeout."""
    _runtime.stop()


def _belongs(sender: Any) -> bool:
    app = getattr(sender, "app", None)
    return app is None or id(app) in _apps


_WORKER_SIGNALS: list[tuple[Any, Callable[..., Any]]] = [
    (signals.worker_init, on_worker_init),
    (signals.worker_process_shutdown, on_worker_process_shutdown),
    (signals.worker_shutdown, on_worker_shutdown),
]


def _connect_worker_handlers() -> None:
    for signal, handler in _TASK_SIGNALS + _WORKER_SIGNALS:
        signal.connect(handler, weak=False, dispatch_uid=f"celery_langfuse.{handler.__name__}")


def _disconnect_worker_handlers() -> None:
    for signal, handler in _TASK_SIGNALS + _WORKER_SIGNALS:
        signal.disconnect(dispatch_uid=f"celery_langfuse.{handler.__name__}")
    signals.worker_init.disconnect(dispatch_uid="celery_langfuse._warn_untraced")

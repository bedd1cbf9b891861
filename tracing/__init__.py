"""celery-langfuse: Celery tasks traced into Langfuse, with no trace event lost when a worker exits.

Usage::

    from celery import Celery
    import tracing

    app = Celery("worker", broker="redis://localhost:6379/0")
    tracing.instrument(app)          # every task becomes a Langfuse observation

Everything public is re-exported here; modules with a leading underscore are internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracing._config import Config, ConfigError, load_config
    from tracing.experiments._experiments import run_experiment
    from tracing.instrumentation._instrument import instrument, is_instrumented, uninstrument
    from tracing.instrumentation._options import TaskOptions, task_options
    from tracing.instrumentation._propagation import TraceAttributes, trace_attributes
    from tracing.instrumentation._scores import score_task
    from tracing.instrumentation._task_span import root_observation_id_for, trace_id_for
    from tracing.instrumentation._urls import trace_url_for
    from tracing.spool import SpoolError

# Where each public name lives. Resolved on first use (PEP 562), so importing a submodule
# (``tracing._cli`` is loaded by every ``celery`` command through the ``celery.commands``
# entry point) does not import the Langfuse SDK and Celery's worker machinery with it.
_EXPORTS = {
    "Config": "tracing._config",
    "ConfigError": "tracing._config",
    "load_config": "tracing._config",
    "instrument": "tracing.instrumentation._instrument",
    "is_instrumented": "tracing.instrumentation._instrument",
    "uninstrument": "tracing.instrumentation._instrument",
    "TaskOptions": "tracing.instrumentation._options",
    "task_options": "tracing.instrumentation._options",
    "TraceAttributes": "tracing.instrumentation._propagation",
    "trace_attributes": "tracing.instrumentation._propagation",
    "score_task": "tracing.instrumentation._scores",
    "run_experiment": "tracing.experiments._experiments",
    "SpoolError": "tracing.spool",
    "root_observation_id_for": "tracing.instrumentation._task_span",
    "trace_id_for": "tracing.instrumentation._task_span",
    "trace_url_for": "tracing.instrumentation._urls",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "Config",
    "ConfigError",
    "SpoolError",
    "TaskOptions",
    "TraceAttributes",
    "instrument",
    "is_instrumented",
    "load_config",
    "root_observation_id_for",
    "run_experiment",
    "score_task",
    "task_options",
    "trace_attributes",
    "trace_id_for",
    "trace_url_for",
    "uninstrument",
]

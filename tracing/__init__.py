"""celery-langfuse: Celery tasks traced into Langfuse, with no trace event lost when a worker exits.

Usage::

    from celery import Celery
    import tracing

    app = Celery("worker", broker="redis://localhost:6379/0")
    tracing.instrument(app)          # every task becomes a Langfuse observation

Everything public is re-exported here; modules with a leading underscore are internal.
"""

from tracing._config import Config, ConfigError, load_config
from tracing._instrument import instrument, is_instrumented, uninstrument
from tracing._options import TaskOptions, task_options
from tracing._propagation import TraceAttributes, trace_attributes
from tracing._scores import score_task
from tracing._spool import SpoolError
from tracing._task_span import root_observation_id_for, trace_id_for
from tracing._urls import trace_url_for

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
    "score_task",
    "task_options",
    "trace_attributes",
    "trace_id_for",
    "trace_url_for",
    "uninstrument",
]

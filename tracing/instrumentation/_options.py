"""Per-task options: ``@task_options(...)``, placed directly under ``@app.task``.

The decorator marks the task *function*; the tracing handlers read the mark from
``task.run`` at run time, so it works the same for ``@app.task``, ``@shared_task`` and
class-based tasks. Put above ``@app.task`` it would receive a Celery task object (or a
``shared_task`` proxy) instead of a function; rather than silently not applying, it raises
``TypeError`` saying where it belongs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["TaskOptions", "options_for", "task_options"]

OBSERVATION_TYPES = frozenset({
    "span", "agent", "chain", "tool", "retriever", "evaluator", "embedding", "guardrail",
    "generation",
})
_MARK = "__celery_langfuse_options__"

F = TypeVar("F", bound=Callable[..., Any])
AttributeExtractor = Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class TaskOptions:
    """How one task is traced; ``None`` means "use the global configuration"."""

    as_type: str = "span"
    capture_input: bool | None = None
    capture_output: bool | None = None
    trace_attributes: AttributeExtractor | None = None
    join: str | None = None  # how the task joins its producer's trace: parent / link / off
    version: str | None = None
    environment: str | None = None
    release: str | None = None


JOIN_MODES = ("parent", "link", "off")
DEFAULT_OPTIONS = TaskOptions()


def task_options(
    *,
    as_type: str = "span",
    capture_input: bool | None = None,
    capture_output: bool | None = None,
    trace_attributes: AttributeExtractor | None = None,
    join: str | None = None,
    version: str | None = None,
    environment: str | None = None,
    release: str | None = None,
) -> Callable[[F], F]:
    """Set how a task is traced. Place it directly under ``@app.task`` / ``@shared_task``.

    ``as_type`` is the Langfuse observation type (``span``, ``agent``, ``chain``, ``tool``,
    ...); ``trace_attributes`` receives the task's kwargs and returns any of ``user_id``,
    ``session_id``, ``tags``, ``metadata``, ``trace_name``, ``version`` for the trace.
    ``join`` says how the task joins the trace of whoever sent it: ``parent`` (a child of
    the sender's observation), ``link`` (a trace of its own, with the sender's trace and
    observation ids in its metadata) or ``off`` (ignore the sender). ``version``,
    ``environment`` and ``release`` override Langfuse's for this task's observations.
    """
    if join is not None and join not in JOIN_MODES:
        raise ValueError(f"task_options(join={join!r}): expected one of {list(JOIN_MODES)}")
    if as_type not in OBSERVATION_TYPES:
        raise ValueError(
            f"task_options(as_type={as_type!r}): expected one of {sorted(OBSERVATION_TYPES)}"
        )
    if trace_attributes is not None and not callable(trace_attributes):
        raise TypeError("task_options(trace_attributes=...) must be a callable over the kwargs")
    options = TaskOptions(as_type, capture_input, capture_output, trace_attributes, join,
                          version, environment, release)

    def mark(func: F) -> F:
        if _is_celery_task(func):
            raise TypeError(
                "@task_options must be placed directly under @app.task / @shared_task "
                "(it received a Celery task object, so it is above the task decorator)"
            )
        if not callable(func):
            raise TypeError(f"@task_options decorates a task function, got {func!r}")
        setattr(func, _MARK, options)
        return func

    return mark


def _is_celery_task(obj: Any) -> bool:
    from celery.app.task import Task
    from celery.local import Proxy

    return isinstance(obj, (Task, Proxy)) or (isinstance(obj, type) and issubclass(obj, Task))


def options_for(task: Any) -> TaskOptions:
    """The options marked on a task's function, or the defaults."""
    for candidate in (getattr(task, "run", None), task):
        options = getattr(candidate, _MARK, None)
        if isinstance(options, TaskOptions):
            return options
    return DEFAULT_OPTIONS

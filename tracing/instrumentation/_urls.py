"""``trace_url_for``: the Langfuse UI address of a task's trace, from the task id alone.

The UI's address of a trace is ``{base_url}/project/{project_id}/traces/{trace_id}``. The
trace id is derived from the tree's root task id (``trace_id_for``); the project id is what
the public API answers for the keys (``GET /api/public/projects``), looked up once per
base URL and key and cached for the life of the process. With ``timeout=0`` (what a task
should pass) the lookup never blocks: it runs in a background thread and the call returns
None until the project id is known. Nothing is looked up in a worker's main process before
the pool forks: a thread importing modules (httpx does, lazily) while Celery forks leaves
the child a module lock it can never take.
"""

from __future__ import annotations

import logging
import threading

import httpx

from tracing._config import Config, load_config
from tracing.instrumentation._task_span import trace_id_for

logger = logging.getLogger("celery_langfuse")

_projects: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def trace_url_for(
    task_id: str, *, root_id: str | None = None, timeout: float = 2.0,
    config: Config | None = None,
) -> str | None:
    """The Langfuse UI URL of the trace of ``task_id`` (pass ``root_id`` inside a canvas).

    None when the project id cannot be known within ``timeout`` seconds (no keys, Langfuse
    unreachable): the lookup is retried on the next call.
    """
    config = config or _config()
    project = project_id(config, timeout)
    if project is None:
        return None
    return f"{config.base_url}/project/{project}/traces/{trace_id_for(root_id or task_id)}"


def project_id(config: Config, timeout: float = 2.0) -> str | None:
    """The project id for the configured keys, cached; looked up in the background if
    ``timeout`` is 0."""
    key = (config.base_url, config.public_key or "")
    if key in _projects or not config.has_keys:
        return _projects.get(key)
    if timeout <= 0:
        warm(config)
        return None
    return _lookup(config, timeout)


def warm(config: Config) -> None:
    """Look the project id up in a background thread."""
    if config.has_keys and (config.base_url, config.public_key or "") not in _projects:
        threading.Thread(target=_lookup, args=(config, 10.0), daemon=True,
                         name="celery-langfuse-project").start()


def _lookup(config: Config, timeout: float) -> str | None:
    key = (config.base_url, config.public_key or "")
    try:
        response = httpx.get(f"{config.base_url}/api/public/projects", timeout=timeout,
                             auth=(config.public_key or "", config.secret_key or ""))
        response.raise_for_status()
        project = str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        logger.warning("celery-langfuse: could not look up the Langfuse project id at %s (%s); "
                       "trace URLs are unavailable until it answers", config.base_url, exc)
        return None
    with _lock:
        _projects[key] = project
    return project


def _config() -> Config:
    from tracing.instrumentation import _runtime

    runtime = _runtime.current()
    return runtime.config if runtime is not None else load_config()

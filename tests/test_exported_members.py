"""The public API is exactly what ``tracing.__all__`` names (httpx's guard, for us)."""

from __future__ import annotations

import tracing

PUBLIC = {
    "Config", "ConfigError", "SpoolError", "TaskOptions", "TraceAttributes", "instrument",
    "is_instrumented", "load_config", "root_observation_id_for", "run_experiment", "score_task",
    "task_options", "trace_attributes", "trace_id_for", "trace_url_for", "uninstrument",
}


def test_all_lists_the_public_api():
    """`tracing.__all__` is the reviewed public API: adding or removing a name is a decision."""
    assert set(tracing.__all__) >= PUBLIC
    assert sorted(tracing.__all__) == list(tracing.__all__)


def test_every_exported_member_exists_and_is_public():
    """Every name in `__all__` is an attribute of the package, defined in a private module."""
    for name in tracing.__all__:
        member = getattr(tracing, name)
        module = getattr(member, "__module__", "tracing")
        private = any(part.startswith("_") for part in module.split(".")[1:])
        assert module == "tracing" or private, (name, module)


def test_every_export_resolves_lazily():
    """Each public name resolves through the lazy table to the object its module defines."""
    import importlib

    for name in tracing.__all__:
        module = importlib.import_module(tracing._EXPORTS[name])
        assert getattr(tracing, name) is getattr(module, name)

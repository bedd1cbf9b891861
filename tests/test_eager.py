"""Eager tasks (``task_always_eager``, ``task.apply()``) traced like a worker run, seen by the
``langfuse_receiver`` fixture in a user's own test (run here as a user would: pytest in a
project directory with no conftest, the plugin from the installed package)."""

# ruff: noqa: RUF001  (canvas names use the multiplication sign)
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

USER_TESTS = '''
import pytest
from celery import Celery, chain, chord, group
from langfuse import Langfuse, get_client

import tracing

app = Celery("users_app", broker="memory://", backend="cache+memory://")
app.conf.task_always_eager = True


@app.task(name="users.summarize")
def summarize(text):
    with get_client().start_as_current_observation(
            name="llm", as_type="generation", model="m", input=text) as generation:
        generation.update(output=text[:5])
    return text[:5]


@app.task(name="users.flaky", bind=True, max_retries=1)
def flaky(self):
    if self.request.retries == 0:
        raise self.retry(exc=ValueError("first try"), countdown=0)
    return "ok"


@pytest.fixture
def traced(langfuse_receiver, tmp_path):
    tracing.instrument(app, public_key=langfuse_receiver.public_key,
                       secret_key=langfuse_receiver.secret_key,
                       base_url=langfuse_receiver.base_url, spool_dir=tmp_path / "spool")
    yield langfuse_receiver
    tracing.uninstrument(app)


def test_eager_task_is_one_observation_with_the_sdk_call_nested(traced):
    """An eager .delay(): the task's observation is its trace's root, the generation under it."""
    result = summarize.delay("hello world")
    assert result.get() == "hello"
    [task] = traced.wait_for_count(1, name="users.summarize")
    [generation] = traced.wait_for_count(1, name="llm")
    assert task.parent_observation_id is None
    assert task.trace_id == tracing.trace_id_for(result.id)
    assert generation.parent_observation_id == task.id
    trace = traced.trace(task.trace_id)
    assert (trace.name, trace.output) == ("users.summarize", "hello")


def test_apply_inside_an_observation_is_its_child(traced):
    """task.apply() inside the caller's observation is that observation's child."""
    client = Langfuse(public_key=traced.public_key, secret_key=traced.secret_key,
                      base_url=traced.base_url)
    with client.start_as_current_observation(name="caller") as caller:
        summarize.apply(args=["inside"])
    [task] = traced.wait_for_count(1, name="users.summarize")
    assert task.parent_observation_id == caller.id and task.trace_id == caller.trace_id


def test_eager_retry_is_two_attempts_in_one_trace(traced):
    """An eager retry: attempt 2 hangs under attempt 1, in the same trace."""
    result = flaky.delay()
    assert result.get() == "ok"
    first, second = sorted(traced.wait_for_count(2, name="users.flaky"),
                           key=lambda o: o.metadata["attempt"])
    assert first.level == "WARNING" and first.parent_observation_id is None
    assert second.parent_observation_id == first.id and second.trace_id == first.trace_id


def test_eager_chain_links_hang_under_the_link_before(traced):
    """An eager chain: the first link is the trace's root, the second its child."""
    result = chain(summarize.s("one two three"), summarize.s()).apply_async()
    assert result.get() == "one t"
    first, second = sorted(traced.wait_for_count(2, name="users.summarize"),
                           key=lambda o: o.start_time)
    assert first.parent_observation_id is None
    assert second.parent_observation_id == first.id and second.trace_id == first.trace_id


def test_eager_group_is_one_trace(traced):
    """An eager group: one trace, the members siblings under the canvas root."""
    result = group(summarize.s(t) for t in ("a text", "b text")).apply_async()
    assert result.get() == ["a tex", "b tex"]
    [root] = traced.wait_for_count(1, name="group: users.summarize ×2")
    members = traced.wait_for_count(2, name="users.summarize")
    assert {m.parent_observation_id for m in members} == {root.id}
    assert root.parent_observation_id is None


def test_eager_chord_with_a_group_callback_nests_the_group(traced):
    """An eager chord whose callback is a group: one trace, that group a node of its own
    under the chord's root, the header's tasks under the root and the group's under it."""
    chord([summarize.s("a text"), summarize.s("b text")],
          group(summarize.s(), summarize.s())).apply_async()
    [root] = traced.wait_for_count(
        1, name="chord: users.summarize ×2 → group(users.summarize ×2)")
    [node] = traced.wait_for_count(1, name="group: users.summarize ×2")
    members = traced.wait_for_count(4, name="users.summarize")
    assert root.parent_observation_id is None and node.parent_observation_id == root.id
    assert sorted(m.parent_observation_id for m in members) == sorted(
        [root.id] * 2 + [node.id] * 2)
'''


def test_users_eager_tests_see_their_tasks_with_the_fixture(tmp_path: Path) -> None:
    """A user's eager-mode tests, with only the `langfuse_receiver` fixture, see each task's
    observation, the SDK calls under it, retries, chains, an eager group as one trace and a
    group as a chord's callback nested under the chord."""
    (tmp_path / "test_users_tasks.py").write_text(textwrap.dedent(USER_TESTS))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:celery",
         str(tmp_path / "test_users_tasks.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


def test_a_worker_turns_the_eager_handlers_off(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """At worker_init the eager handlers are disconnected (they would cost every task), the
    task handlers stay, in the order that puts the eager preparation first elsewhere."""
    from types import SimpleNamespace

    from celery import Celery, signals

    import tracing
    from tracing.instrumentation import _instrument, _runtime

    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-eager")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-eager")
    monkeypatch.setenv("CELERY_LANGFUSE_SPOOL_DIR", str(tmp_path))
    monkeypatch.setattr(_runtime, "start", lambda config: None)
    monkeypatch.setattr(_instrument, "_config", None)  # restored after: no keys leak onward
    app = Celery("eager-off")
    tracing.instrument(app)
    try:
        def prerun() -> list[str]:
            return [r[0][0] for r in signals.task_prerun.receivers
                    if str(r[0][0]).startswith("celery_langfuse.")]

        assert prerun() == ["celery_langfuse.on_eager_prerun", "celery_langfuse.on_task_prerun"]
        _instrument.on_worker_init(sender=SimpleNamespace(app=app))
        assert prerun() == ["celery_langfuse.on_task_prerun"]
        postrun = [r[0][0] for r in signals.task_postrun.receivers]
        assert "celery_langfuse.on_task_postrun" in postrun
        assert "celery_langfuse.after_eager_postrun" not in postrun
    finally:
        tracing.uninstrument(app)

"""Canvases as Langfuse v4 shows them (tracing/testing/_traces.py cites the server files):
a group or chord is one trace, its members siblings under one parent.

One real prefork worker serves the module; the test process is the producer, with the
worker's keys and spool, as a web service importing the instrumented app would be.
"""

# ruff: noqa: RUF001, RUF002  (canvas names use the multiplication sign)
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery, chain, chord, group
from celery.canvas import chunks
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider

import tracing
from tests.support import RedisServer, WorkerProcess, worker_environment
from tracing._config import Config
from tracing.instrumentation import _instrument, _producer
from tracing.testing import LangfuseReceiver, Observation, Trace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, module_receiver: LangfuseReceiver,
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return worker_environment(redis_server, module_receiver,
                              tmp_path_factory.mktemp("spool"), 13)


@pytest.fixture(scope="module")
def worker(env: dict[str, str]) -> Iterator[WorkerProcess]:
    process = WorkerProcess("tests.apps.traced_app", env, queue=env["TEST_QUEUE"])
    try:
        yield process.wait_ready()
    finally:
        process.kill_group()


@pytest.fixture
def app(env: dict[str, str], worker: WorkerProcess, monkeypatch: pytest.MonkeyPatch,
        ) -> Iterator[Celery]:
    """A producer app in this process, with the worker's keys and spool (as ``instrument``
    would give a producer importing the instrumented app module)."""
    producer = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
    producer.conf.task_default_queue = env["TEST_QUEUE"]
    config: Config = tracing.load_config(environ=env)
    monkeypatch.setattr(_instrument, "_config", config)
    with producer_spool(monkeypatch):
        from tracing.instrumentation._propagation import connect_publish_handler

        connect_publish_handler()
        yield producer
    producer.close()


@contextlib.contextmanager
def producer_spool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's producer spool state, fresh for the test; its shipper stopped after."""
    for name, value in (("_shipper", None), ("_pid", 0), ("_writers", {}), ("_config", None)):
        monkeypatch.setattr(_producer, name, value)
    try:
        yield
    finally:
        shipper = _producer._shipper
        if shipper:
            shipper.stop(1.0)


def one_trace(receiver: LangfuseReceiver, trace_id: str, names: dict[str, int]) -> Trace:
    """Wait until ``trace_id`` holds ``names`` (observation name → count); its v4 view."""
    def complete(obs: list[Observation]) -> bool:
        mine = [o for o in obs if o.trace_id == trace_id]
        return all(len([o for o in mine if o.name == n]) >= k for n, k in names.items())

    receiver.wait_for(complete, timeout=30, what=f"{names} in trace {trace_id}")
    return receiver.trace(trace_id)


def test_chord_from_outside_is_one_trace_under_one_canvas_root(app, module_receiver):
    """A chord sent from outside any trace is one trace: exactly one parentless span (the
    canvas root, named after the chord, its input the members), the members and the callback
    its children, and the trace's name, input and output the root's."""
    header = [app.signature("t.add", args=[i, i]) for i in range(3)]
    result = chord(header, app.signature("t.chain_step", args=[9])).apply_async()
    result.get(timeout=30)
    group_id = result.parent.id
    name = "chord: t.add ×3 → t.chain_step"
    trace = one_trace(module_receiver, tracing.trace_id_for(group_id),
                      {name: 1, "t.add": 3, "t.chain_step": 1})
    [root] = trace.roots
    assert root.parent_observation_id is None and root.type == "chain"
    assert root.id == tracing.root_observation_id_for(group_id)
    assert [o.id for o in trace.observations if o.parent_observation_id is None] == [root.id]
    tasks = [o for o in trace.observations if o.name in ("t.add", "t.chain_step")]
    assert len(tasks) == 4
    assert {o.parent_observation_id for o in tasks} == {root.id}
    assert not any(o.is_app_root for o in tasks)
    assert trace.name == name
    assert trace.input == root.input
    assert [m["task"] for m in trace.input["members"]] == ["t.add"] * 3
    assert trace.input["members"][1]["args"] == [1, 1]
    assert trace.input["callback"]["task"] == "t.chain_step"
    assert trace.output == root.output and trace.output["group_id"] == group_id
    assert sorted(trace.output["task_ids"]) == sorted(r.id for r in result.parent.results)


@pytest.mark.parametrize("members", ["retrying", "replaced", "replaced by a group",
                                     "replaced by a chord", "a chain"])
def test_the_callback_hangs_under_the_canvas_root_however_its_members_run(
        app, module_receiver, members):
    """The chord callback hangs under the canvas root when the member that fires it is a
    retry (its message carried the pin on), a member's replacement (``Task.replace``: the
    pin went with it; a replacing chord's members carry both chords' pins) or a chain's
    last link (the pin is in the callback itself)."""
    if members == "retrying":
        header = [app.signature("t.retry") for _ in range(2)]
        names = {"t.retry": 4}
    elif members == "replaced":
        header = [app.signature("t.replaced", args=[i]) for i in range(2)]
        names = {"t.replaced": 2, "t.add": 2}
    elif members == "replaced by a group":
        header = [app.signature("t.replaced_by_group", args=[1]), app.signature("t.add",
                                                                                args=[2, 2])]
        names = {"t.replaced_by_group": 1, "t.add": 3}
    elif members == "replaced by a chord":
        header = [app.signature("t.replaced_by_chord", args=[1]), app.signature("t.add",
                                                                                 args=[2, 2])]
        names = {"t.replaced_by_chord": 1, "t.add": 3, "t.echo": 1}
    else:
        header = [chain(app.signature("t.add", args=[1, 1]), app.signature("t.add", args=[2])),
                  app.signature("t.add", args=[3, 3])]
        names = {"t.add": 3}
    result = chord(header, app.signature("t.chain_step", args=[9])).apply_async()
    result.get(timeout=30)
    trace = one_trace(module_receiver, tracing.trace_id_for(result.parent.id),
                      {**names, "t.chain_step": 1})
    [root] = trace.roots
    assert root.id == tracing.root_observation_id_for(result.parent.id)
    [callback] = [o for o in trace.observations if o.name == "t.chain_step"]
    assert callback.parent_observation_id == root.id, [
        (o.name, o.id, o.parent_observation_id) for o in trace.observations]
    if members == "replaced by a chord":  # the inner chord's callback: under its sender
        [inner] = [o for o in trace.observations if o.name == "t.echo"]
        [sender] = [o for o in trace.observations if o.name == "t.replaced_by_chord"]
        assert inner.parent_observation_id == sender.id


def test_group_from_outside_is_one_trace_of_siblings(app, module_receiver):
    """A group sent from outside any trace is one trace, its members siblings under the
    canvas root `group: t.add ×3`."""
    result = group(app.signature("t.add", args=[i, 1]) for i in range(3)).apply_async()
    assert result.get(timeout=30) == [1, 2, 3]
    trace = one_trace(module_receiver, tracing.trace_id_for(result.id),
                      {"group: t.add ×3": 1, "t.add": 3})
    [root] = trace.roots
    assert root.type == "span" and trace.name == "group: t.add ×3"
    members = [o for o in trace.observations if o.name == "t.add"]
    assert {m.parent_observation_id for m in members} == {root.id}
    assert {m.metadata["task_id"] for m in members} == {r.id for r in result.results}


def test_chunks_are_one_trace_of_starmap_siblings(app, module_receiver):
    """``chunks(...).apply_async()`` (a group of Celery's ``celery.starmap`` tasks) is one
    trace named for the task it maps, the chunks siblings under its root."""
    result = chunks(app.signature("t.add"), [(i, i) for i in range(4)], 2).apply_async()
    assert result.get(timeout=30) == [[0, 2], [4, 6]]
    trace = one_trace(module_receiver, tracing.trace_id_for(result.id),
                      {"group: starmap(t.add) ×2": 1, "celery.starmap": 2})
    [root] = trace.roots
    assert trace.name == "group: starmap(t.add) ×2"
    assert {o.parent_observation_id for o in trace.observations
            if o.name == "celery.starmap"} == {root.id}


def test_trace_attributes_name_the_canvas_trace(app, module_receiver):
    """`trace_attributes(trace_name=, user_id=)` around a chord: the root carries the name
    and the user, so the trace shows them."""
    header = [app.signature("t.add", args=[i, 2]) for i in range(2)]
    with tracing.trace_attributes(trace_name="nightly-digest", user_id="u-7"):
        result = chord(header, app.signature("t.chain_step", args=[1])).apply_async()
    result.get(timeout=30)
    trace = one_trace(module_receiver, tracing.trace_id_for(result.parent.id),
                      {"nightly-digest": 1, "t.add": 2, "t.chain_step": 1})
    assert trace.name == "nightly-digest" and trace.user_id == "u-7"
    assert len(trace.roots) == 1 and trace.roots[0].name == "nightly-digest"


def test_canvas_sent_inside_an_observation_has_no_extra_root(app, module_receiver):
    """A chord sent inside a producer's observation: its members and callback are that
    observation's children; no canvas root is written."""
    client = Langfuse(public_key=module_receiver.public_key,
                      secret_key=module_receiver.secret_key,
                      base_url=module_receiver.base_url, tracer_provider=TracerProvider())
    header = [app.signature("t.add", args=[i, 3]) for i in range(2)]
    with client.start_as_current_observation(name="web-request", input="q") as parent:
        result = chord(header, app.signature("t.chain_step", args=[2])).apply_async()
    client.flush()
    result.get(timeout=30)
    trace = one_trace(module_receiver, parent.trace_id,
                      {"web-request": 1, "t.add": 2, "t.chain_step": 1})
    assert [r.id for r in trace.roots] == [parent.id]
    assert (trace.name, trace.input) == ("web-request", "q")
    tasks = [o for o in trace.observations if o.name in ("t.add", "t.chain_step")]
    assert {o.parent_observation_id for o in tasks} == {parent.id}
    assert not [o for o in module_receiver.observations if o.name.startswith("chord:")
                and o.trace_id == parent.trace_id]


def test_chord_inside_a_group_keeps_the_rule_one_level_down(app, module_receiver):
    """A group of two chords: one parentless root for the group, a canvas node per chord under
    it, each chord's members and callback under its own node."""
    chords = [chord([app.signature("t.add", args=[i, j]) for i in range(2)],
                    app.signature("t.chain_step", args=[j])) for j in range(2)]
    result = group(chords).apply_async()
    result.get(timeout=30)
    outer = "group: chord(t.add ×2 → t.chain_step) ×2"
    inner = "chord: t.add ×2 → t.chain_step"
    trace = one_trace(module_receiver, tracing.trace_id_for(result.id),
                      {outer: 1, inner: 2, "t.add": 4, "t.chain_step": 2})
    [root] = trace.roots
    assert root.name == outer and root.parent_observation_id is None
    nodes = [o for o in trace.observations if o.name == inner]
    assert {n.parent_observation_id for n in nodes} == {root.id}
    for node in nodes:
        children = [o for o in trace.observations if o.parent_observation_id == node.id]
        assert sorted(o.name for o in children) == ["t.add", "t.add", "t.chain_step"]


def test_a_chain_of_two_groups_is_one_trace(app, module_receiver):
    """A chain of two groups (Celery makes it a chord whose callback is a group): one trace,
    one parentless root with the first group's tasks under it, and the second group, sent by
    a member's worker, a node of its own under the root with its tasks under it."""
    first = group(app.signature("t.add", args=[i, 5]) for i in range(2))
    second = group(app.signature("t.chain_step", args=[i]) for i in range(2))
    result = chain(first, second).apply_async()
    result.get(timeout=30)
    name, inner = "chord: t.add ×2 → group(t.chain_step ×2)", "group: t.chain_step ×2"
    trace = one_trace(module_receiver, tracing.trace_id_for(result.parent.id),
                      {name: 1, inner: 1, "t.add": 2, "t.chain_step": 2})
    [root] = trace.roots
    assert root.name == name and root.parent_observation_id is None
    [node] = [o for o in trace.observations if o.name == inner]
    assert node.parent_observation_id == root.id and node.id == (
        tracing.root_observation_id_for(result.id))
    adds = [o for o in trace.observations if o.name == "t.add"]
    steps = [o for o in trace.observations if o.name == "t.chain_step"]
    assert {o.parent_observation_id for o in adds} == {root.id}
    assert {o.parent_observation_id for o in steps} == {node.id}


def test_a_chord_sent_by_a_chain_link_hangs_under_that_link(app, module_receiver):
    """chain(a, chord(...)) from outside: the first link is the trace's root; the chord, sent
    by that link's worker inside its observation, has its members and callback under it."""
    workflow = chain(app.signature("t.chain_step", args=["go", 1]),
                     chord([app.signature("t.add", args=[i, 6], immutable=True)
                            for i in range(2)], app.signature("t.chain_step", args=[2])))
    result = workflow.apply_async()
    result.get(timeout=30)
    first = result
    while first.parent is not None:
        first = first.parent
    trace = one_trace(module_receiver, tracing.trace_id_for(first.id),
                      {"t.chain_step": 2, "t.add": 2})
    [root] = trace.roots
    assert root.metadata["task_id"] == first.id
    later = [o for o in trace.observations if o.id != root.id
             and o.name in ("t.add", "t.chain_step")]
    assert len(later) == 3 and {o.parent_observation_id for o in later} == {root.id}


def test_chain_keeps_its_rule(app, module_receiver):
    """A chain sent from outside still has its first link as the root and no canvas root."""
    result = chain(app.signature("t.chain_step", args=["c", 1]),
                   app.signature("t.chain_step", args=[2])).apply_async()
    result.get(timeout=30)
    trace = one_trace(module_receiver, tracing.trace_id_for(result.parent.id),
                      {"t.chain_step": 2})
    [root] = trace.roots
    assert root.metadata["task_id"] == result.parent.id
    [second] = [o for o in trace.observations if o.name == "t.chain_step" and o.id != root.id]
    assert second.parent_observation_id == root.id


def test_root_id_given_by_the_sender_names_the_trace(app, module_receiver):
    """A chord sent with `root_id=` its first member's id (the old way to keep it in one
    trace) keeps that trace id, now with the members as siblings under the canvas root."""
    first = str(uuid.uuid4())
    header = [app.signature("t.add", args=[i, 4]) for i in range(2)]
    header[0].set(task_id=first)
    result = chord(header, app.signature("t.chain_step", args=[3])).apply_async(root_id=first)
    result.get(timeout=30)
    trace = one_trace(module_receiver, tracing.trace_id_for(first),
                      {"chord: t.add ×2 → t.chain_step": 1, "t.add": 2, "t.chain_step": 1})
    [root] = trace.roots
    tasks = [o for o in trace.observations if o.name in ("t.add", "t.chain_step")]
    assert {o.parent_observation_id for o in tasks} == {root.id}


PRODUCER = """
import sys
from celery import Celery, group
import tracing

app = Celery(broker=sys.argv[1], backend=sys.argv[1])
app.conf.task_default_queue = sys.argv[2]
tracing.instrument(app)
print(group(app.signature("t.add", args=[5, i]) for i in range(2)).apply_async().id)
"""


def test_a_producer_that_exits_at_once_still_delivers_the_canvas_root(
        env, worker, module_receiver, tmp_path: Path):
    """A producer process that sends a group and exits at once (its own spool, which no
    worker ships): the canvas root arrives, shipped by its last bounded attempt at exit."""
    producer_env = {**os.environ, **env,
                    "CELERY_LANGFUSE_SPOOL_DIR": str(tmp_path / "producer-spool")}
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, env["CELERY_BROKER_URL"], env["TEST_QUEUE"]],
        env=producer_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    group_id = done.stdout.strip().splitlines()[-1]
    trace = one_trace(module_receiver, tracing.trace_id_for(group_id),
                      {"group: t.add ×2": 1, "t.add": 2})
    assert len(trace.roots) == 1 and trace.name == "group: t.add ×2"

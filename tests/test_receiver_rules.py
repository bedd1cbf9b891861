"""One test per Langfuse v4.16 server rule that tracing.testing mirrors (see its docstrings)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.capture import Captured
from tests.test_receiver import make_batch, post
from tracing.testing import LangfuseReceiver, Observation

TRACE = "ab" * 16


def span_id(n: int) -> bytes:
    return n.to_bytes(8, "big")


def send(receiver: LangfuseReceiver, *spans: dict[str, Any]) -> None:
    """One request holding these spans, which must be accepted."""
    response = post(receiver, make_batch(*spans).SerializeToString())
    assert response.status_code == 200, response.text


def only(receiver: LangfuseReceiver, **attributes: Any) -> Observation:
    """The one observation decoded from a span carrying these attributes."""
    send(receiver, {"name": "s", "attributes": attributes})
    [obs] = receiver.observations
    return obs


# --------------------------------------------------------------------------- roots and traces


def test_a_root_has_no_parent_span_id_or_is_an_app_root(receiver: LangfuseReceiver) -> None:
    """Roots: an empty parent span id, or langfuse.internal.is_app_root; as_root is ignored."""
    send(
        receiver,
        {"name": "top", "span_id": span_id(1)},
        {"name": "app", "span_id": span_id(2), "parent": span_id(1),
         "attributes": {"langfuse.internal.is_app_root": True}},
        {"name": "as-root", "span_id": span_id(3), "parent": span_id(1),
         "attributes": {"langfuse.internal.as_root": True}},
        {"name": "child", "span_id": span_id(4), "parent": span_id(1)},
    )
    roots = {o.name for o in receiver.observations if o.is_root}
    assert roots == {"top", "app"}
    assert [o.name for o in receiver.trace(TRACE).roots] == ["top", "app"]


def test_trace_name_is_the_name_of_the_root_that_arrived_last(receiver: LangfuseReceiver) -> None:
    """Without langfuse.trace.name the trace takes the last-arrived root's name, not the first
    started one's: an app root arriving after the true root renames the trace."""
    send(receiver, {"name": "first-task", "span_id": span_id(1), "start": 1_700_000_000 * 10**9})
    assert receiver.trace(TRACE).name == "first-task"
    send(receiver, {"name": "second-task", "span_id": span_id(2), "parent": span_id(1),
                    "start": 1_699_000_000 * 10**9,
                    "attributes": {"langfuse.internal.is_app_root": True}})
    send(receiver, {"name": "plain-child", "span_id": span_id(3), "parent": span_id(1)})
    assert receiver.trace(TRACE).name == "second-task"


def test_trace_name_attribute_on_any_span_wins(receiver: LangfuseReceiver) -> None:
    """The last non-empty langfuse.trace.name of any observation, even a child, names the trace."""
    send(
        receiver,
        {"name": "root", "span_id": span_id(1), "attributes": {"langfuse.trace.name": "early"}},
        {"name": "child", "span_id": span_id(2), "parent": span_id(1),
         "attributes": {"langfuse.trace.name": "late"}},
        {"name": "other", "span_id": span_id(3), "parent": span_id(1)},
    )
    assert receiver.trace(TRACE).name == "late"


def test_trace_io_and_metadata_come_only_from_a_parentless_span(receiver: LangfuseReceiver) -> None:
    """An app root with a parent (or any child) never gives the trace input, output or
    metadata: only the last-arrived span with an EMPTY parent span id does."""
    io = {"langfuse.observation.input": '{"q": 1}', "langfuse.observation.output": '"a"',
          "langfuse.observation.metadata.k": '"v"'}
    send(receiver, {"name": "task", "span_id": span_id(2), "parent": span_id(9),
                    "attributes": {**io, "langfuse.internal.is_app_root": True}})
    trace = receiver.trace(TRACE)
    assert (trace.name, trace.input, trace.output, trace.metadata) == ("task", None, None, {})
    assert trace.root is None

    send(receiver, {"name": "producer", "span_id": span_id(1), "attributes": io})
    trace = receiver.trace(TRACE)
    assert (trace.input, trace.output, trace.metadata) == ({"q": 1}, "a", {"k": "v"})
    assert trace.root is not None and trace.root.name == "producer"


def test_trace_user_session_and_tags_are_the_last_non_empty(receiver: LangfuseReceiver) -> None:
    """user, session and tags: the last non-empty value of any observation; tags not merged."""
    send(
        receiver,
        {"name": "root", "span_id": span_id(1),
         "attributes": {"user.id": "u1", "session.id": "s1", "langfuse.trace.tags": ["a", "b"]}},
        {"name": "child", "span_id": span_id(2), "parent": span_id(1),
         "attributes": {"user.id": "u2", "langfuse.trace.tags": ["c"]}},
        {"name": "quiet", "span_id": span_id(3), "parent": span_id(1)},
    )
    trace = receiver.trace(TRACE)
    assert (trace.user_id, trace.session_id, trace.tags) == ("u2", "s1", ["c"])


def test_trace_view_is_listed_waited_for_and_printed(receiver: LangfuseReceiver) -> None:
    """traces_view/find_traces/wait_for_trace give the Trace; tree() prints name, input, output."""
    send(receiver, {"name": "job", "span_id": span_id(1),
                    "attributes": {"langfuse.observation.input": '{"text": "hi"}',
                                   "langfuse.observation.output": '"HI"'}},
         {"name": "step", "span_id": span_id(2), "parent": span_id(1)})
    assert list(receiver.traces_view()) == [TRACE]
    [trace] = receiver.find_traces(name="job")
    assert receiver.wait_for_trace(TRACE, lambda t: t.output == "HI", timeout=5) == trace
    assert [o.name for o in trace.observations] == ["job", "step"]
    assert trace.to_dict()["roots"] == [span_id(1).hex()]
    lines = receiver.tree(TRACE).splitlines()
    assert lines[:3] == [f"trace {TRACE} name='job'", '  input:  {"text": "hi"}',
                         '  output: HI']
    assert receiver.format_traces().splitlines()[:3] == lines[:3]
    controls = httpx.get(receiver.base_url + "/_receiver/traces", timeout=5).json()
    assert [(t["name"], t["output"]) for t in controls] == [("job", "HI")]


# --------------------------------------------------------------------------- observation fields


def test_openai_completion_usage_is_stored_as_input_output_total(
    receiver: LangfuseReceiver,
) -> None:
    """OpenAI prompt/completion/total_tokens become input 11 / output 3 / total 14."""
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    obs = only(receiver, **{"langfuse.observation.usage_details": json.dumps(usage)})
    assert obs.usage_details == {"input": 11, "output": 3, "total": 14}
    assert obs.total_tokens == 14


def test_openai_usage_details_are_split_out_of_input_and_output(
    receiver: LangfuseReceiver,
) -> None:
    """Cached/reasoning details move into their own keys and out of input/output."""
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
             "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": None},
             "completion_tokens_details": {"reasoning_tokens": 1}}
    obs = only(receiver, **{"langfuse.observation.usage_details": json.dumps(usage)})
    assert obs.usage_details == {"input": 7, "output": 2, "total": 14,
                                 "input_cached_tokens": 4, "output_reasoning_tokens": 1}


def test_openai_responses_api_usage_is_normalised(receiver: LangfuseReceiver) -> None:
    """The Responses API's input/output/total_tokens become input/output/total too."""
    usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    obs = only(receiver, **{"langfuse.observation.usage_details": json.dumps(usage)})
    assert obs.usage_details == {"input": 5, "output": 2, "total": 7}


def test_other_usage_keeps_integer_keys_and_gets_a_total(receiver: LangfuseReceiver) -> None:
    """Any other usage keeps its non-negative integers as sent; a missing total is their sum."""
    usage = {"input": 12, "output": 5, "cache": "3", "ratio": 0.5, "bad": -1, "nested": {"x": 1}}
    obs = only(receiver, **{"langfuse.observation.usage_details": json.dumps(usage)})
    assert obs.usage_details == {"input": 12, "output": 5, "cache": 3, "total": 20}


def test_gen_ai_usage_attributes_are_mapped(receiver: LangfuseReceiver) -> None:
    """Without Langfuse usage, gen_ai.usage.* is folded into input/output/total."""
    obs = only(receiver, **{"gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 4,
                            "gen_ai.request.model": "m-1"})
    assert obs.usage_details == {"input": 9, "output": 4, "total": 13}
    assert (obs.model, obs.type) == ("m-1", "generation")


def test_input_and_output_cost_get_a_total(receiver: LangfuseReceiver) -> None:
    """A provided input+output cost is stored with their sum as total."""
    obs = only(receiver, **{"langfuse.observation.cost_details": '{"input": 0.5, "output": 0.25}'})
    assert obs.cost_details == {"input": 0.5, "output": 0.25, "total": 0.75}


def test_times_are_kept_to_the_millisecond(receiver: LangfuseReceiver) -> None:
    """Start/end nanoseconds are floored to milliseconds; a span without end ends at start."""
    start = 1_700_000_000_123_456_789
    send(receiver, {"name": "a", "span_id": span_id(1), "start": start, "end": start + 2_999_999},
         {"name": "open", "span_id": span_id(2), "start": start, "end": 0})
    a, open_span = receiver.observations
    assert a.start_time == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert a.end_time is not None and a.end_time.microsecond == 126000
    assert a.duration_ms == 3.0
    assert open_span.end_time == open_span.start_time


def test_trace_metadata_is_merged_into_observation_metadata(receiver: LangfuseReceiver) -> None:
    """Propagated trace metadata joins each observation's metadata; trace keys win."""
    obs = only(receiver, **{"langfuse.observation.metadata.k": '"obs"',
                            "langfuse.observation.metadata.only": "1",
                            "langfuse.trace.metadata.k": '"trace"',
                            "langfuse.trace.metadata.tenant": '"acme"'})
    assert obs.metadata == {"k": "trace", "only": 1, "tenant": "acme"}
    assert obs.trace_metadata == {"k": "trace", "tenant": "acme"}


def test_level_aliases_environment_and_user_fallbacks(receiver: LangfuseReceiver) -> None:
    """Level names like WARN map onto Langfuse's; environment is lower-cased without a
    langfuse prefix; langfuse.user.id is read before user.id."""
    obs = only(receiver, **{"langfuse.observation.level": "warn",
                            "langfuse.environment": "Langfuse-Prod",
                            "langfuse.user.id": "compat", "user.id": "plain"})
    assert (obs.level, obs.environment, obs.user_id) == ("WARNING", "prod", "compat")


# --------------------------------------------------------------------------- status codes


def test_large_bodies_are_accepted_without_a_limit(receiver: LangfuseReceiver) -> None:
    """The route has no size limit (it logs above 16 MB): a 6 MB batch is a 200."""
    big = make_batch({"name": "big", "attributes": {"blob": "y" * 6_000_000}}).SerializeToString()
    assert post(receiver, big).status_code == 200
    assert [o.name for o in receiver.observations] == ["big"]


def test_max_request_bytes_opts_into_a_proxy_413() -> None:
    """max_request_bytes= makes the receiver answer 413 above it, like Langfuse Cloud's proxy."""
    with LangfuseReceiver(public_key="pk-lf-413", max_request_bytes=200) as small:
        big = make_batch({"name": "x", "attributes": {"blob": "y" * 500}}).SerializeToString()
        assert post(small, big, auth=False).status_code == 413  # before auth, like a proxy
        assert small.observations == []
        assert post(small, make_batch({"name": "ok"}).SerializeToString()).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "status", "message"),
    [
        (None, 401, "No authorization header"),
        ("Basic eDp5", 401,
         "Invalid credentials. Confirm that you've configured the correct host."),
        ("Token abc", 401, "Invalid authorization header"),
        ("BEARER", 403, "Access denied - insufficient permissions for this endpoint"),
    ],
)
def test_auth_failures_answer_as_the_server(
    receiver: LangfuseReceiver, authorization: str | None, status: int, message: str
) -> None:
    """Missing/wrong keys are 401 and a public-key Bearer token 403, with the server's message."""
    headers = {} if authorization is None else {
        "Authorization": f"Bearer {receiver.public_key}" if authorization == "BEARER"
        else authorization}
    response = post(receiver, make_batch({"name": "a"}).SerializeToString(),
                    headers=headers, auth=False)
    assert (response.status_code, response.json()) == (status, {"message": message})
    assert receiver.observations == []


def test_suspended_ingestion_is_403(receiver: LangfuseReceiver) -> None:
    """set_suspended() answers valid keys 403 "Ingestion suspended", until reset_faults()."""
    body = make_batch({"name": "a"}).SerializeToString()
    receiver.set_suspended()
    response = post(receiver, body)
    assert response.status_code == 403
    assert response.json()["message"].startswith("Ingestion suspended")
    receiver.reset_faults()
    assert post(receiver, body).status_code == 200


@pytest.mark.parametrize(("version", "status"), [("4", 200), ("3", 200), ("5", 400), ("x", 400)])
def test_ingestion_version_must_parse_and_be_at_most_4(
    receiver: LangfuseReceiver, version: str, status: int
) -> None:
    """x-langfuse-ingestion-version: parseInt NaN or above 4 is 400; 4 and below are fine."""
    body = make_batch({"name": "a"}).SerializeToString()
    response = post(receiver, body, headers={"x-langfuse-ingestion-version": version})
    assert response.status_code == status


def test_unknown_content_type_is_400(receiver: LangfuseReceiver) -> None:
    """A body neither protobuf nor JSON answers 400 "Invalid content type"."""
    body = make_batch({"name": "a"}).SerializeToString()
    response = post(receiver, body, headers={"Content-Type": "text/plain"})
    assert (response.status_code, response.json()) == (400, {"error": "Invalid content type"})


def test_ingestion_api_bodies_over_4_5_mb_are_413(receiver: LangfuseReceiver) -> None:
    """/api/public/ingestion has Next.js's 4.5 MB body limit (413), unlike the OTLP route."""
    body = json.dumps({"batch": [], "pad": "p" * (int(4.5 * 1024 * 1024) + 1)}).encode()
    response = httpx.post(receiver.base_url + "/api/public/ingestion", content=body,
                          headers={"Authorization": receiver.auth_header(),
                                   "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 413


# --------------------------------------------------------------------------- the pytest plugin


def test_installed_plugin_gives_the_fixture_without_a_conftest(tmp_path: Path) -> None:
    """The pytest11 entry point provides langfuse_receiver to a project with no conftest."""
    (tmp_path / "test_user.py").write_text(
        "def test_it(langfuse_receiver):\n"
        "    assert langfuse_receiver.running and langfuse_receiver.port > 0\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:celery",
         str(tmp_path / "test_user.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_captured_spans_read_as_langfuse_observations_and_traces(captured: Captured) -> None:
    """The in-memory capture applies the same rules: usage as stored, the trace's name/io."""
    with captured.langfuse.start_as_current_observation(name="job", input={"q": 1}) as job:
        with captured.langfuse.start_as_current_observation(
            name="llm", as_type="generation",
            usage_details={"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        ):
            pass
        job.update(output="done")
    by_name = {o.name: o for o in captured.observations()}
    assert by_name["llm"].usage_details == {"input": 2, "output": 1, "total": 3}
    trace = captured.trace(by_name["job"].trace_id)
    assert (trace.name, trace.input, trace.output) == ("job", {"q": 1}, "done")

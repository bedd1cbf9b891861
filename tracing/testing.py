"""A Langfuse-compatible loopback receiver for tests and demos.

No Langfuse server can run in a plain CI job, yet the interesting failures of a tracing
integration (lost spans, duplicates, broken parent links, retries against an overloaded
server) only show up when real spans travel over real HTTP. :class:`LangfuseReceiver` is a
small HTTP server on loopback that speaks the part of Langfuse's public API the SDK and an
OTLP shipper talk to:

* ``POST /api/public/otel/v1/traces`` -- OTLP/HTTP (protobuf or JSON, optionally gzip),
  Basic auth with a public/secret key pair, the ``x-langfuse-ingestion-version`` check, and
  Langfuse's whole-batch rejection (one span without valid ids answers 400 and nothing of
  the batch is stored). Success is ``200`` with the JSON body ``{}``, as Langfuse answers.
* ``POST /api/public/scores`` (the v5 SDK's batched score endpoint) and the legacy
  ``POST /api/public/ingestion`` batch endpoint; scores land in :attr:`LangfuseReceiver.scores`.
* ``GET /api/public/health`` and ``GET /api/public/projects`` (``Langfuse().auth_check()``).

Every accepted span is decoded into an :class:`Observation` using Langfuse's own attribute
names (``langfuse.observation.type``, ``...level``, ``...usage_details``, flattened
``langfuse.observation.metadata.<key>`` values, ``user.id``, ``session.id``, ...), so a test
asserts on what Langfuse would show, not on raw OpenTelemetry data::

    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider
    from tracing.testing import LangfuseReceiver

    with LangfuseReceiver(public_key="pk-lf-mytest") as receiver:
        client = Langfuse(public_key="pk-lf-mytest", secret_key="sk-lf-test",
                          base_url=receiver.base_url, tracer_provider=TracerProvider())
        with client.start_as_current_observation(name="job"):
            pass
        client.flush()
        [job] = receiver.wait_for_count(1, name="job")
        print(receiver.tree(job.trace_id))

Faults are injected at any time and from any thread: :meth:`LangfuseReceiver.fail_next`
(e.g. 429 with ``Retry-After``), :meth:`~LangfuseReceiver.set_fail_rate` (seeded random 5xx),
:meth:`~LangfuseReceiver.set_latency`, :meth:`~LangfuseReceiver.set_auth_keys` (key rotation,
401 until the client follows), :meth:`~LangfuseReceiver.set_poison` (whole-batch 400 for a
span matching a predicate) and :meth:`~LangfuseReceiver.down` / :meth:`~LangfuseReceiver.up`
(connection refused, then the same port again).

Waiting never sleeps: :meth:`LangfuseReceiver.wait_for` blocks on a condition variable that
is notified whenever spans are stored, and fails with a message that says what it waited for
and what arrived instead.

For pytest, the ``langfuse_receiver`` fixture yields a started receiver with a public key
unique to the test (the Langfuse SDK keeps one client per public key per process, so reusing
a key would silently reuse the first test's client and URL). Enable it with
``pytest_plugins = ["tracing.testing"]`` or ``from tracing.testing import langfuse_receiver``.

Run standalone (for demos, or to watch a worker from another terminal)::

    python -m tracing.testing --port 3000 --public-key pk-lf-demo --secret-key sk-lf-demo

It prints ``listening on http://127.0.0.1:3000`` and serves ``GET /_receiver/observations``
(JSON), ``GET /_receiver/tree`` (text), ``GET /_receiver/requests``, ``GET /_receiver/scores``
and ``POST /_receiver/clear`` besides the Langfuse endpoints.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import gzip
import hmac
import json
import logging
import random
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = [
    "LangfuseReceiver",
    "Observation",
    "ReceivedRequest",
    "langfuse_receiver",
    "main",
    "receiver_env",
]

logger = logging.getLogger(__name__)

TRACES_PATH = "/api/public/otel/v1/traces"
SCORES_PATH = "/api/public/scores"
INGESTION_PATH = "/api/public/ingestion"
HEALTH_PATH = "/api/public/health"
PROJECTS_PATH = "/api/public/projects"
MAX_INGESTION_VERSION = 4
DEFAULT_MAX_REQUEST_BYTES = 5 * 1024 * 1024
# Bodies above this are not even drained: the connection is answered 413 and closed.
_DRAIN_LIMIT_BYTES = 256 * 1024 * 1024

# Langfuse's OTel attribute names (langfuse/_client/attributes.py in the Python SDK).
A_TYPE = "langfuse.observation.type"
A_LEVEL = "langfuse.observation.level"
A_STATUS_MESSAGE = "langfuse.observation.status_message"
A_INPUT = "langfuse.observation.input"
A_OUTPUT = "langfuse.observation.output"
A_METADATA = "langfuse.observation.metadata"
A_MODEL = "langfuse.observation.model.name"
A_MODEL_PARAMETERS = "langfuse.observation.model.parameters"
A_USAGE = "langfuse.observation.usage_details"
A_COST = "langfuse.observation.cost_details"
A_COMPLETION_START = "langfuse.observation.completion_start_time"
A_TRACE_NAME = "langfuse.trace.name"
A_TRACE_TAGS = "langfuse.trace.tags"
A_TRACE_METADATA = "langfuse.trace.metadata"
A_USER_ID = "user.id"
A_SESSION_ID = "session.id"
A_ENVIRONMENT = "langfuse.environment"
A_RELEASE = "langfuse.release"
A_VERSION = "langfuse.version"
A_AS_ROOT = "langfuse.internal.as_root"

_OTEL_STATUS_ERROR = 2
_LEVELS = ("DEBUG", "DEFAULT", "WARNING", "ERROR")

PoisonPredicate = Callable[[dict[str, Any]], bool]


# --------------------------------------------------------------------------- data model


@dataclasses.dataclass(frozen=True)
class Observation:
    """One accepted span, decoded the way Langfuse decodes it.

    ``parent_observation_id`` is the OTel parent span id, as Langfuse stores it; ``is_root``
    follows Langfuse's rule (no parent, or ``langfuse.internal.as_root`` set), which is what
    makes a span carry the trace-level fields in Langfuse. ``metadata`` holds only the user's
    observation metadata (Langfuse additionally shows resource and scope attributes there;
    find those in ``resource_attributes`` and ``scope_name``). ``attributes`` keeps every raw
    span attribute, arrays as lists.
    """

    id: str
    trace_id: str
    parent_observation_id: str | None
    name: str
    type: str
    level: str
    status_message: str | None
    input: Any
    output: Any
    metadata: dict[str, Any]
    model: str | None
    model_parameters: dict[str, Any] | None
    usage_details: dict[str, Any]
    cost_details: dict[str, Any]
    completion_start_time: datetime | None
    start_time: datetime
    end_time: datetime | None
    environment: str
    release: str | None
    version: str | None
    user_id: str | None
    session_id: str | None
    tags: list[str]
    trace_name: str | None
    trace_metadata: dict[str, Any]
    is_root: bool
    status_code: int
    kind: int
    scope_name: str
    scope_version: str
    attributes: dict[str, Any]
    resource_attributes: dict[str, Any]
    received_at: float

    @property
    def duration_ms(self) -> float | None:
        """Span duration in milliseconds, or None when the span has no end time."""
        if self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds() * 1000.0

    @property
    def total_tokens(self) -> int | float | None:
        """``usage_details["total"]``, else the sum of the usage values, else None."""
        return _total(self.usage_details)

    @property
    def total_cost(self) -> int | float | None:
        """``cost_details["total"]``, else the sum of the cost values, else None."""
        return _total(self.cost_details)

    def to_dict(self, *, json_safe: bool = True) -> dict[str, Any]:
        """The fields as a dict; with ``json_safe`` datetimes become ISO strings."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _json_safe(out) if json_safe else out


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request as the receiver saw it and answered it."""

    at: float  # time.monotonic() at arrival
    method: str
    path: str
    status: int
    span_count: int
    span_ids: tuple[str, ...]
    headers: dict[str, str]  # lower-cased names
    body_bytes: int
    note: str = ""


def _total(values: Mapping[str, Any]) -> int | float | None:
    if not values:
        return None
    total = values.get("total")
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        return total
    numbers = [v for v in values.values() if isinstance(v, (int, float))]
    return sum(numbers) if numbers else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- OTLP decoding


class _BadBatch(Exception):
    """The batch is rejected as a whole (400), nothing of it is stored."""


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def _maybe_json(value: Any) -> Any:
    """JSON-decode a string when it is valid JSON; anything else is returned unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _json_dict(value: Any) -> dict[str, Any]:
    decoded = _maybe_json(value)
    return decoded if isinstance(decoded, dict) else {}


def _metadata(attributes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Metadata in both forms the SDKs write.

    Langfuse SDK v5 flattens a dict into one attribute per key,
    ``<prefix>.<key>``, each value JSON-encoded (strings included: ``"\\"abc\\""``); non-dict
    metadata (and older SDKs) use a single JSON attribute ``<prefix>``.
    """
    out: dict[str, Any] = {}
    if prefix in attributes:
        top = _maybe_json(attributes[prefix])
        if isinstance(top, dict):
            out.update(top)
        elif top is not None:
            out["metadata"] = top
    dotted = prefix + "."
    for key, value in attributes.items():
        if key.startswith(dotted):
            out[key[len(dotted) :]] = _maybe_json(value)
    return out


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    decoded = _maybe_json(value)
    if isinstance(decoded, list):
        return [str(v) for v in decoded]
    return [t.strip() for t in str(value).split(",") if t.strip()]


def _nanos(value: int) -> datetime | None:
    if not value:
        return None
    return datetime.fromtimestamp(value / 1e9, tz=timezone.utc)


def _parse_time(value: Any) -> datetime | None:
    decoded = _maybe_json(value)
    if not isinstance(decoded, str):
        return None
    try:
        parsed = datetime.fromisoformat(decoded.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _first(attributes: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = attributes.get(key)
        if value not in (None, ""):
            return value
    return None


def _usage(attributes: Mapping[str, Any]) -> dict[str, Any]:
    usage = _json_dict(attributes.get(A_USAGE))
    if usage:
        return usage
    # OpenTelemetry GenAI conventions, which Langfuse maps as well.
    mapping = {
        "input": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
        "output": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
        "total": ("gen_ai.usage.total_tokens", "llm.usage.total_tokens"),
    }
    for name, keys in mapping.items():
        value = _first(attributes, *keys)
        if isinstance(value, (int, float)):
            usage[name] = value
    return usage


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _decode_span(
    span: Any,
    scope: Any,
    resource_attributes: dict[str, Any],
    received_at: float,
) -> Observation:
    attributes = _attributes(span.attributes)
    parent = span.parent_span_id.hex() if any(span.parent_span_id) else None
    model = _first(attributes, A_MODEL, "gen_ai.request.model", "gen_ai.response.model")
    obs_type = attributes.get(A_TYPE)
    if not obs_type:
        obs_type = "generation" if model is not None else "span"
    level = attributes.get(A_LEVEL)
    if level not in _LEVELS:
        level = "ERROR" if span.status.code == _OTEL_STATUS_ERROR else "DEFAULT"
    status_message = attributes.get(A_STATUS_MESSAGE)
    if status_message is None and span.status.message:
        status_message = span.status.message
    environment = (
        _first(attributes, A_ENVIRONMENT, "deployment.environment.name", "deployment.environment")
        or _first(
            resource_attributes,
            A_ENVIRONMENT,
            "deployment.environment.name",
            "deployment.environment",
        )
        or "default"
    )
    model_parameters = _maybe_json(attributes.get(A_MODEL_PARAMETERS))
    return Observation(
        id=span.span_id.hex(),
        trace_id=span.trace_id.hex(),
        parent_observation_id=parent,
        name=span.name,
        type=str(obs_type),
        level=str(level),
        status_message=_str_or_none(status_message),
        input=_maybe_json(attributes.get(A_INPUT)),
        output=_maybe_json(attributes.get(A_OUTPUT)),
        metadata=_metadata(attributes, A_METADATA),
        model=_str_or_none(model),
        model_parameters=model_parameters if isinstance(model_parameters, dict) else None,
        usage_details=_usage(attributes),
        cost_details=_json_dict(attributes.get(A_COST)),
        completion_start_time=_parse_time(attributes.get(A_COMPLETION_START)),
        start_time=_nanos(span.start_time_unix_nano) or datetime.fromtimestamp(0, timezone.utc),
        end_time=_nanos(span.end_time_unix_nano),
        environment=str(environment),
        release=_str_or_none(
            _first(attributes, A_RELEASE) or _first(resource_attributes, A_RELEASE)
        ),
        version=_str_or_none(_first(attributes, A_VERSION)),
        user_id=_str_or_none(_first(attributes, A_USER_ID, "langfuse.user.id")),
        session_id=_str_or_none(_first(attributes, A_SESSION_ID, "langfuse.session.id")),
        tags=_tags(attributes.get(A_TRACE_TAGS)),
        trace_name=_str_or_none(attributes.get(A_TRACE_NAME)),
        trace_metadata=_metadata(attributes, A_TRACE_METADATA),
        is_root=parent is None or _truthy(attributes.get(A_AS_ROOT)),
        status_code=int(span.status.code),
        kind=int(span.kind),
        scope_name=scope.name,
        scope_version=scope.version,
        attributes=attributes,
        resource_attributes=resource_attributes,
        received_at=received_at,
    )


def _valid_id(raw: bytes, size: int) -> bool:
    return len(raw) == size and any(raw)


def _iter_spans(request: Any) -> Iterator[tuple[Any, Any, Any]]:
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield resource_spans, scope_spans, span


def _validate_ids(request: Any) -> None:
    for index, (_, _, span) in enumerate(_iter_spans(request)):
        what = f"span #{index} ({span.name!r})"
        if not _valid_id(span.trace_id, 16):
            raise _BadBatch(f"{what} has no valid traceId (16 bytes, not all zero)")
        if not _valid_id(span.span_id, 8):
            raise _BadBatch(f"{what} has no valid spanId (8 bytes, not all zero)")
        if span.parent_span_id and len(span.parent_span_id) != 8:
            raise _BadBatch(f"{what} has a malformed parentSpanId")


def _decode_observations(request: Any, received_at: float) -> list[Observation]:
    out: list[Observation] = []
    for resource_spans in request.resource_spans:
        resource_attributes = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(_decode_span(span, scope_spans.scope, resource_attributes, received_at))
    return out


def _hex_ids_to_base64(document: Any) -> Any:
    """OTLP/JSON encodes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    for resource_spans in document.get("resourceSpans") or []:
        for scope_spans in resource_spans.get("scopeSpans") or []:
            for span in scope_spans.get("spans") or []:
                for key in ("traceId", "spanId", "parentSpanId"):
                    value = span.get(key)
                    if isinstance(value, str) and value:
                        try:
                            span[key] = base64.b64encode(bytes.fromhex(value)).decode()
                        except ValueError:
                            span[key] = value  # let the protobuf parser reject it
    return document


def _parse_otlp(content_type: str, body: bytes) -> Any:
    """Parse an ExportTraceServiceRequest; raises _BadBatch with Langfuse's messages."""
    request = ExportTraceServiceRequest()
    if "application/x-protobuf" in content_type:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise _BadBatch(f"Failed to parse OTel Protobuf Trace: {exc}") from exc
        return request
    if "application/json" in content_type:
        try:
            document = _hex_ids_to_base64(json.loads(body))
            json_format.ParseDict(document, request, ignore_unknown_fields=True)
        except (ValueError, AttributeError, json_format.ParseError) as exc:
            raise _BadBatch(f"Failed to parse OTel JSON Trace: {exc}") from exc
        return request
    raise _BadBatch(f"Invalid content type: {content_type or '(none)'}")


# --------------------------------------------------------------------------- server plumbing


@dataclasses.dataclass(frozen=True)
class _Fault:
    status: int
    retry_after: str | None
    body: bytes
    content_type: str


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    receiver: LangfuseReceiver
    generation: int

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can stall.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Without TCP_NODELAY, Nagle's algorithm meets the client's delayed ACK and every
        # answer waits ~40 ms: the receiver would look like a slow Langfuse.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.receiver._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.receiver._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("receiver: " + format, *args)

    def do_GET(self) -> None:
        self.server.receiver._dispatch(self, "GET")

    def do_POST(self) -> None:
        self.server.receiver._dispatch(self, "POST")

    def do_PUT(self) -> None:
        self.server.receiver._dispatch(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.receiver._dispatch(self, "DELETE")


class _Abort(Exception):
    """The receiver went down while answering: drop the connection without an answer."""


# --------------------------------------------------------------------------- the receiver


class LangfuseReceiver:
    """A loopback HTTP server that accepts what a Langfuse client sends and records it.

    Thread-safe: the server answers each connection on its own thread, and every setter and
    query may be called from any thread at any time.
    """

    def __init__(
        self,
        public_key: str = "pk-lf-test",
        secret_key: str = "sk-lf-test",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self._host = host
        self._port = port
        self._max_request_bytes = max_request_bytes
        self._cond = threading.Condition(threading.RLock())
        self._public_key = public_key
        self._secret_key = secret_key
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._down_event = threading.Event()
        self._connections: set[socket.socket] = set()
        self._observations: list[Observation] = []
        self._id_counts: Counter[str] = Counter()
        self._requests: list[ReceivedRequest] = []
        self._scores: list[dict[str, Any]] = []
        self._ingestion_events: list[dict[str, Any]] = []
        self._faults: list[_Fault] = []
        self._fail_rate = 0.0
        self._fail_rate_fault: _Fault | None = None
        self._rng = random.Random(0)
        self._latency = 0.0
        self._poison: PoisonPredicate | None = None
        self._in_flight = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LangfuseReceiver:
        """Bind (the same port as before, after a stop) and serve in a daemon thread."""
        with self._cond:
            if self._server is not None:
                return self
            server_class = _Server6 if ":" in self._host else _Server
            server = server_class((self._host, self._port), _Handler)
            self._port = int(server.server_address[1])
            self._generation += 1
            server.receiver = self
            server.generation = self._generation
            self._down_event = threading.Event()
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"langfuse-receiver-{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections; requests in flight get no answer."""
        with self._cond:
            server, thread = self._server, self._thread
            if server is None:
                return
            self._server = None
            self._thread = None
            self._generation += 1
            self._down_event.set()
            connections = list(self._connections)
        server.shutdown()
        server.server_close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join()

    def down(self) -> None:
        """Simulate Langfuse being unreachable (connection refused); keeps the port."""
        self.stop()

    def up(self) -> None:
        """Bring the receiver back on the same port after :meth:`down`."""
        self.start()

    @property
    def running(self) -> bool:
        with self._cond:
            return self._server is not None

    def __enter__(self) -> LangfuseReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the requested one before the first start)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``: the value for ``LANGFUSE_BASE_URL``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def traces_url(self) -> str:
        return self.base_url + TRACES_PATH

    @property
    def public_key(self) -> str:
        with self._cond:
            return self._public_key

    @property
    def secret_key(self) -> str:
        with self._cond:
            return self._secret_key

    @property
    def max_request_bytes(self) -> int:
        return self._max_request_bytes

    def auth_header(self) -> str:
        """The ``Authorization`` header value the receiver currently accepts."""
        with self._cond:
            token = f"{self._public_key}:{self._secret_key}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")

    # ----------------------------------------------------------------- fault injection

    def fail_next(
        self,
        n: int,
        status: int,
        retry_after: float | str | None = None,
        body: str | bytes | Mapping[str, Any] | None = None,
    ) -> None:
        """Answer the next ``n`` trace POSTs with ``status`` (queued after earlier ones).

        The failure comes before authentication and parsing, like an overloaded gateway's;
        nothing of the batch is stored. ``retry_after`` becomes the ``Retry-After`` header;
        ``body`` replaces the default JSON ``{"message": ...}``.
        """
        fault = self._make_fault(status, retry_after, body)
        with self._cond:
            self._faults.extend([fault] * n)

    def set_fail_rate(
        self,
        rate: float,
        status: int = 503,
        seed: int = 0,
        retry_after: float | str | None = None,
    ) -> None:
        """Fail a random ``rate`` share of trace POSTs, reproducibly (seeded RNG)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate!r}")
        fault = self._make_fault(status, retry_after, None)
        with self._cond:
            self._fail_rate = rate
            self._fail_rate_fault = fault
            self._rng = random.Random(seed)

    def set_latency(self, seconds: float) -> None:
        """Wait this long before answering each ingestion request (0 to turn off)."""
        with self._cond:
            self._latency = max(0.0, float(seconds))

    def set_auth_keys(self, public_key: str, secret_key: str) -> None:
        """Accept only this key pair from now on (clients on the old keys get 401)."""
        with self._cond:
            self._public_key = public_key
            self._secret_key = secret_key

    def set_poison(self, predicate: PoisonPredicate | None) -> None:
        """Reject (400) every batch holding a span for which ``predicate(span)`` is true.

        ``span`` is :meth:`Observation.to_dict` with ``json_safe=False``. Langfuse rejects
        a whole batch for one bad span; this reproduces that. ``None`` clears it.
        """
        with self._cond:
            self._poison = predicate

    def reset_faults(self) -> None:
        """Drop queued failures, the failure rate, latency and the poison predicate."""
        with self._cond:
            self._faults.clear()
            self._fail_rate = 0.0
            self._fail_rate_fault = None
            self._latency = 0.0
            self._poison = None

    @staticmethod
    def _make_fault(
        status: int,
        retry_after: float | str | None,
        body: str | bytes | Mapping[str, Any] | None,
    ) -> _Fault:
        if isinstance(retry_after, float) and retry_after.is_integer():
            retry_after = int(retry_after)
        header = None if retry_after is None else str(retry_after)
        if body is None:
            payload = json.dumps({"message": f"injected failure (HTTP {status})"}).encode()
            content_type = "application/json"
        elif isinstance(body, Mapping):
            payload = json.dumps(dict(body)).encode()
            content_type = "application/json"
        elif isinstance(body, str):
            payload = body.encode()
            content_type = "text/plain; charset=utf-8"
        else:
            payload = bytes(body)
            content_type = "application/octet-stream"
        return _Fault(status, header, payload, content_type)

    def _take_fault(self) -> _Fault | None:
        with self._cond:
            if self._faults:
                return self._faults.pop(0)
            if self._fail_rate_fault is not None and self._rng.random() < self._fail_rate:
                return self._fail_rate_fault
            return None

    # ----------------------------------------------------------------- queries

    @property
    def observations(self) -> list[Observation]:
        """Every accepted span in arrival order (a copy; duplicates included)."""
        with self._cond:
            return list(self._observations)

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received (a copy), including rejected and failed ones."""
        with self._cond:
            return list(self._requests)

    @property
    def trace_requests(self) -> list[ReceivedRequest]:
        """The requests to the OTLP traces endpoint."""
        return [r for r in self.requests if r.path == TRACES_PATH]

    @property
    def scores(self) -> list[dict[str, Any]]:
        """Score bodies received through ``/api/public/scores`` or ``/api/public/ingestion``."""
        with self._cond:
            return list(self._scores)

    @property
    def ingestion_events(self) -> list[dict[str, Any]]:
        """All events received through the legacy ``/api/public/ingestion`` endpoint."""
        with self._cond:
            return list(self._ingestion_events)

    def observations_by_id(self) -> dict[str, list[Observation]]:
        """Observations grouped by span id; a list longer than one is a duplicate."""
        out: dict[str, list[Observation]] = {}
        for obs in self.observations:
            out.setdefault(obs.id, []).append(obs)
        return out

    def duplicates(self) -> dict[str, int]:
        """Span ids accepted more than once, with how many times."""
        with self._cond:
            return {span_id: n for span_id, n in self._id_counts.items() if n > 1}

    def traces(self) -> dict[str, list[Observation]]:
        """Observations grouped by trace id (first-seen order), each list by start time."""
        out: dict[str, list[Observation]] = {}
        for obs in self.observations:
            out.setdefault(obs.trace_id, []).append(obs)
        return {tid: sorted(group, key=lambda o: o.start_time) for tid, group in out.items()}

    def find(
        self,
        name: str | None = None,
        type: str | None = None,
        trace_id: str | None = None,
        level: str | None = None,
    ) -> list[Observation]:
        """Observations matching every given criterion, in arrival order."""
        return [
            obs
            for obs in self.observations
            if (name is None or obs.name == name)
            and (type is None or obs.type == type)
            and (trace_id is None or obs.trace_id == trace_id)
            and (level is None or obs.level == level)
        ]

    def get(self, observation_id: str) -> Observation:
        """The (first received) observation with this id; KeyError when none arrived."""
        for obs in self.observations:
            if obs.id == observation_id:
                return obs
        raise KeyError(observation_id)

    def clear(self) -> None:
        """Forget observations, requests and scores (faults stay as they are)."""
        with self._cond:
            self._observations.clear()
            self._id_counts.clear()
            self._requests.clear()
            self._scores.clear()
            self._ingestion_events.clear()
            self._cond.notify_all()

    # ----------------------------------------------------------------- waiting

    def wait_for(
        self,
        predicate: Callable[[list[Observation]], Any],
        timeout: float = 30.0,
        what: str = "a condition on the received observations",
    ) -> list[Observation]:
        """Block until ``predicate(observations)`` is truthy; return the observations then.

        Raises AssertionError after ``timeout`` seconds, naming ``what`` and summarising
        what did arrive.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._observations)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{self.summary()}")

    def wait_for_count(
        self, n: int, name: str | None = None, timeout: float = 30.0
    ) -> list[Observation]:
        """Wait until ``n`` distinct span ids (named ``name``, if given) have arrived.

        Returns the matching observations, duplicates included.
        """

        def matching(observations: list[Observation]) -> list[Observation]:
            return [o for o in observations if name is None or o.name == name]

        label = f"{n} observation(s)" + (f" named {name!r}" if name is not None else "")
        observations = self.wait_for(
            lambda obs: len({o.id for o in matching(obs)}) >= n, timeout=timeout, what=label
        )
        return matching(observations)

    def wait_for_scores(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` scores have arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._scores) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {n} score(s); "
                        f"received {len(self._scores)}: {self._scores!r}"
                    )
                self._cond.wait(remaining)
            return list(self._scores)

    @property
    def in_flight(self) -> int:
        """Requests to the Langfuse endpoints being handled right now."""
        with self._cond:
            return self._in_flight

    def wait_for_in_flight(self, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until at least ``n`` requests are being handled (e.g. held by latency).

        With :meth:`set_latency`, this lets a test take the receiver :meth:`down` while a
        client's request is in flight: its outcome is unknown to the client.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {n} request(s) in flight; "
                        f"{self._in_flight} in flight, {len(self._requests)} answered"
                    )
                self._cond.wait(remaining)

    def summary(self) -> str:
        """A short account of what arrived: counts, names, request statuses, trees."""
        observations = self.observations
        requests = self.requests
        names = Counter(o.name for o in observations)
        statuses = Counter(r.status for r in requests if r.path == TRACES_PATH)
        lines = [
            f"received {len(observations)} observation(s) "
            f"({len({o.id for o in observations})} distinct) in "
            f"{len({o.trace_id for o in observations})} trace(s)",
            "names: " + (", ".join(f"{k} x{v}" for k, v in names.most_common()) or "(none)"),
            f"trace requests: {sum(statuses.values())} "
            + (
                "(" + ", ".join(f"HTTP {k} x{v}" for k, v in sorted(statuses.items())) + ")"
                if statuses
                else ""
            ),
        ]
        duplicates = self.duplicates()
        if duplicates:
            lines.append(f"duplicates: {duplicates}")
        trees = self.format_traces()
        tree_lines = trees.splitlines()
        if len(tree_lines) > 80:
            tree_lines = [*tree_lines[:80], f"... ({len(tree_lines) - 80} more lines)"]
        if tree_lines:
            lines.extend(tree_lines)
        return "\n".join(lines)

    # ----------------------------------------------------------------- trees

    def tree(self, trace_id: str) -> str:
        """A printable tree of one trace: children under parents, by start time."""
        observations = self.traces().get(trace_id)
        if not observations:
            return f"trace {trace_id}: no observations received"
        return _render_trace(trace_id, observations, self.duplicates())

    def format_traces(self) -> str:
        """Every trace as a tree, earliest first."""
        traces = self.traces()
        duplicates = self.duplicates()
        ordered = sorted(traces.items(), key=lambda item: item[1][0].start_time)
        return "\n\n".join(_render_trace(tid, obs, duplicates) for tid, obs in ordered)

    # ----------------------------------------------------------------- HTTP handling

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _record(self, handler: _Handler, method: str, status: int, **fields: Any) -> None:
        request = ReceivedRequest(
            at=fields.pop("at"),
            method=method,
            path=handler.path.split("?", 1)[0],
            status=status,
            span_count=fields.pop("span_count", 0),
            span_ids=tuple(fields.pop("span_ids", ())),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body_bytes=fields.pop("body_bytes", 0),
            note=fields.pop("note", ""),
        )
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def _dispatch(self, handler: _Handler, method: str) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/") or "/"
        at = time.monotonic()
        generation = handler.server.generation
        if path.startswith("/_receiver/"):
            try:
                self._handle_control(handler, method, path)
            except OSError:
                handler.close_connection = True
            return
        with self._cond:
            self._in_flight += 1
            self._cond.notify_all()
        try:
            if method == "POST" and path == TRACES_PATH:
                self._handle_traces(handler, at, generation)
            elif method == "POST" and path == SCORES_PATH:
                self._handle_scores(handler, at, generation)
            elif method == "POST" and path == INGESTION_PATH:
                self._handle_ingestion(handler, at, generation)
            elif method == "GET" and path == HEALTH_PATH:
                self._record(handler, method, 200, at=at)
                self._send_json(handler, 200, {"status": "OK", "version": "3.0.0"})
            elif method == "GET" and path == PROJECTS_PATH:
                self._read_body(handler)
                if not self._check_auth(handler, method, at):
                    return
                project = {
                    "id": "demo-project",
                    "name": "demo",
                    "organization": {"id": "demo-org", "name": "demo"},
                    "metadata": {},
                }
                self._record(handler, method, 200, at=at)
                self._send_json(handler, 200, {"data": [project]})
            else:
                self._read_body(handler)
                status = 405 if path in {TRACES_PATH, SCORES_PATH, INGESTION_PATH} else 404
                self._record(handler, method, status, at=at)
                self._send_json(handler, status, {"message": f"{method} {path}: not found"})
        except _Abort:
            handler.close_connection = True
            self._record(handler, method, 0, at=at, note="receiver went down mid-request")
        except OSError as exc:
            handler.close_connection = True
            logger.debug("receiver: connection error on %s %s: %s", method, path, exc)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def _read_body(self, handler: _Handler) -> tuple[bytes, bool]:
        """Read the request body; returns (body, too_large). Oversized bodies are drained."""
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(handler)
        try:
            length = max(0, int(handler.headers.get("Content-Length") or 0))
        except ValueError:
            handler.close_connection = True  # cannot find the end of this request
            return b"", False
        if length > self._max_request_bytes:
            if length > _DRAIN_LIMIT_BYTES:
                handler.close_connection = True
                return b"", True
            remaining = length
            while remaining > 0:
                chunk = handler.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
            return b"", True
        return handler.rfile.read(length) if length else b"", False

    def _read_chunked(self, handler: _Handler) -> tuple[bytes, bool]:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = handler.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line or b"0", 16)
            except ValueError:
                handler.close_connection = True
                return b"", False
            if size == 0:
                while handler.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunk = handler.rfile.read(size)
            handler.rfile.readline(16)
            total += len(chunk)
            if total <= self._max_request_bytes:
                parts.append(chunk)
        return (b"", True) if total > self._max_request_bytes else (b"".join(parts), False)

    def _authorized(self, handler: _Handler) -> bool:
        header = handler.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        public_key, sep, secret_key = decoded.partition(":")
        with self._cond:
            expected_pk, expected_sk = self._public_key, self._secret_key
        return (
            bool(sep)
            and hmac.compare_digest(public_key.encode(), expected_pk.encode())
            and hmac.compare_digest(secret_key.encode(), expected_sk.encode())
        )

    def _check_auth(self, handler: _Handler, method: str, at: float, **fields: Any) -> bool:
        if self._authorized(handler):
            return True
        message = (
            "Access denied - need to use basic auth with secret key to access this API"
            if handler.headers.get("Authorization")
            else "Unauthorized: no Authorization header"
        )
        self._record(handler, method, 401, at=at, note="unauthorized", **fields)
        self._send_json(handler, 401, {"message": message})
        return False

    def _apply_latency(self, generation: int) -> None:
        with self._cond:
            latency, down = self._latency, self._down_event
        if latency > 0:
            down.wait(latency)
        self._check_alive(generation)

    def _check_alive(self, generation: int) -> None:
        with self._cond:
            if generation != self._generation or self._server is None:
                raise _Abort

    def _handle_traces(self, handler: _Handler, at: float, generation: int) -> None:
        body, too_large = self._read_body(handler)
        method = "POST"
        content_type = handler.headers.get("Content-Type", "").lower()
        encoding = handler.headers.get("Content-Encoding", "").lower()
        payload: bytes | None = body
        if not too_large and "gzip" in encoding:
            try:
                payload = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                payload = None
        request: Any = None
        parse_error = ""
        if payload is not None and not too_large:
            try:
                request = _parse_otlp(content_type, payload)
            except _BadBatch as exc:
                parse_error = str(exc)
        span_ids = [span.span_id.hex() for _, _, span in _iter_spans(request)] if request else []
        fields: dict[str, Any] = {
            "at": at,
            "span_count": len(span_ids),
            "span_ids": span_ids,
            "body_bytes": len(body),
        }

        self._apply_latency(generation)
        fault = self._take_fault()
        if fault is not None:
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._record(handler, method, fault.status, note="injected failure", **fields)
            self._send(handler, fault.status, fault.body, fault.content_type, extra)
            return
        if too_large:
            limit = self._max_request_bytes
            message = f"Request body exceeds the limit of {limit} bytes"
            self._record(handler, method, 413, note="too large", **fields)
            self._send_json(handler, 413, {"message": message})
            return
        if not self._check_auth(handler, method, at, **_without(fields, "at")):
            return
        version = handler.headers.get("x-langfuse-ingestion-version")
        if version is not None:
            try:
                unsupported = int(version.strip()) > MAX_INGESTION_VERSION
            except ValueError:
                unsupported = True
            if unsupported:
                message = (
                    f'Unsupported x-langfuse-ingestion-version: "{version}". '
                    f'Maximum supported: "{MAX_INGESTION_VERSION}".'
                )
                self._reject(handler, fields, message)
                return
        if payload is None:
            self._reject(handler, fields, "Failed to decompress request body")
            return
        if request is None:
            self._reject(handler, fields, parse_error)
            return
        try:
            _validate_ids(request)
        except _BadBatch as exc:
            self._reject(handler, fields, str(exc))
            return
        observations = _decode_observations(request, at)
        with self._cond:
            poison = self._poison
        if poison is not None:
            for obs in observations:
                try:
                    poisoned = poison(obs.to_dict(json_safe=False))
                except Exception as exc:
                    message = f"poison predicate raised {type(exc).__name__}: {exc}"
                    self._record(handler, "POST", 500, note=message, **fields)
                    self._send_json(handler, 500, {"message": message})
                    return
                if poisoned:
                    self._reject(handler, fields, f"poisoned span {obs.id} ({obs.name!r})")
                    return
        with self._cond:
            if generation != self._generation or self._server is None:
                raise _Abort
            self._observations.extend(observations)
            self._id_counts.update(o.id for o in observations)
            self._record(handler, method, 200, **fields)  # same lock: seen together
        self._send_json(handler, 200, {})

    def _reject(self, handler: _Handler, fields: dict[str, Any], message: str) -> None:
        self._record(handler, "POST", 400, note=message, **fields)
        self._send_json(handler, 400, {"error": message, "message": message})

    def _read_json(self, handler: _Handler, at: float, generation: int) -> tuple[bool, Any]:
        body, too_large = self._read_body(handler)
        self._apply_latency(generation)
        if not self._check_auth(handler, "POST", at, body_bytes=len(body)):
            return False, None
        if too_large:
            self._record(handler, "POST", 413, at=at, note="too large")
            self._send_json(handler, 413, {"message": "Request body too large"})
            return False, None
        try:
            raw = (
                gzip.decompress(body)
                if "gzip" in handler.headers.get("Content-Encoding", "").lower()
                else body
            )
            return True, json.loads(raw or b"null")
        except (ValueError, OSError, EOFError, zlib.error) as exc:
            message = f"Invalid JSON body: {exc}"
            self._record(handler, "POST", 400, at=at, body_bytes=len(body), note=message)
            self._send_json(handler, 400, {"message": message})
            return False, None

    def _handle_scores(self, handler: _Handler, at: float, generation: int) -> None:
        ok, document = self._read_json(handler, at, generation)
        if not ok:
            return
        items = document if isinstance(document, list) else [document]
        if not all(isinstance(item, dict) for item in items):
            message = "Score body must be an object or a list of objects"
            self._record(handler, "POST", 400, at=at, note=message)
            self._send_json(handler, 400, {"message": message})
            return
        # v5 SDK: a list, answered 202 Accepted; older SDKs: one score, answered its id.
        batched = isinstance(document, list)
        status = 202 if batched else 200
        with self._cond:
            self._check_alive(generation)
            self._scores.extend(items)
            self._record(handler, "POST", status, at=at, span_count=len(items))
        if batched:
            self._send_json(handler, status, {"message": "Accepted"})
        else:
            self._send_json(handler, status, {"id": document.get("id") or str(uuid.uuid4())})

    def _handle_ingestion(self, handler: _Handler, at: float, generation: int) -> None:
        ok, document = self._read_json(handler, at, generation)
        if not ok:
            return
        batch = document.get("batch") if isinstance(document, dict) else None
        if not isinstance(batch, list):
            message = "Body must be an object with a 'batch' list"
            self._record(handler, "POST", 400, at=at, note=message)
            self._send_json(handler, 400, {"message": message})
            return
        successes: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        scores: list[dict[str, Any]] = []
        for event in batch:
            if not isinstance(event, dict) or "type" not in event:
                errors.append({"id": "", "status": 400, "message": "Invalid event"})
                continue
            events.append(event)
            successes.append({"id": event.get("id", ""), "status": 201})
            if event.get("type") == "score-create" and isinstance(event.get("body"), dict):
                scores.append(event["body"])
        with self._cond:
            self._check_alive(generation)
            self._ingestion_events.extend(events)
            self._scores.extend(scores)
            self._record(handler, "POST", 207, at=at, span_count=len(events))
        self._send_json(handler, 207, {"successes": successes, "errors": errors})

    def _handle_control(self, handler: _Handler, method: str, path: str) -> None:
        self._read_body(handler)
        if method == "GET" and path == "/_receiver/observations":
            self._send_json(handler, 200, [o.to_dict() for o in self.observations])
        elif method == "GET" and path == "/_receiver/tree":
            text = self.format_traces() + "\n"
            self._send(handler, 200, text.encode(), "text/plain; charset=utf-8")
        elif method == "GET" and path == "/_receiver/requests":
            self._send_json(
                handler, 200, [_json_safe(dataclasses.asdict(r)) for r in self.requests]
            )
        elif method == "GET" and path == "/_receiver/scores":
            self._send_json(handler, 200, self.scores)
        elif method == "GET" and path == "/_receiver/duplicates":
            self._send_json(handler, 200, self.duplicates())
        elif method == "POST" and path == "/_receiver/clear":
            self.clear()
            self._send_json(handler, 200, {})
        else:
            self._send_json(handler, 404, {"message": f"{method} {path}: not found"})

    def _send_json(self, handler: _Handler, status: int, document: Any) -> None:
        self._send(handler, status, json.dumps(document).encode(), "application/json")

    @staticmethod
    def _send(
        handler: _Handler,
        status: int,
        body: bytes,
        content_type: str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (extra_headers or {}).items():
            handler.send_header(key, value)
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()


def _without(fields: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in keys}


# --------------------------------------------------------------------------- rendering


def _format_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(obs: Observation, copies: int) -> str:
    parts = [f"{obs.name} [{obs.type}] {obs.level}"]
    duration = obs.duration_ms
    parts.append("(open)" if duration is None else f"{duration:.1f} ms")
    if obs.model:
        parts.append(f"model={obs.model}")
    usage = obs.usage_details
    if usage:
        shown: list[str] = [k for k in ("input", "output", "total") if k in usage]
        shown = shown or sorted(usage)
        parts.append("tokens " + " ".join(f"{k}={_format_number(usage[k])}" for k in shown))
    cost = obs.total_cost
    if cost is not None:
        parts.append(f"cost=${cost:.6f}")
    if obs.status_message and obs.level != "DEFAULT":
        message = obs.status_message.splitlines()[0] if obs.status_message else ""
        parts.append(f'"{message[:120]}"')
    if copies > 1:
        parts.append(f"DUPLICATE x{copies}")
    return " ".join(parts)


def _render_trace(
    trace_id: str, observations: list[Observation], duplicates: Mapping[str, int]
) -> str:
    by_id: dict[str, Observation] = {}
    for obs in observations:
        by_id.setdefault(obs.id, obs)
    unique = sorted(by_id.values(), key=lambda o: o.start_time)
    children: dict[str | None, list[Observation]] = {}
    for obs in unique:
        parent = obs.parent_observation_id
        key = parent if parent in by_id else None
        children.setdefault(key, []).append(obs)

    source = next((o for o in unique if o.is_root), unique[0])
    info = [f"trace {trace_id}"]
    trace_name = next((o.trace_name for o in unique if o.trace_name), None) or source.name
    info.append(f"name={trace_name!r}")
    for label, value in (
        ("user", next((o.user_id for o in unique if o.user_id), None)),
        ("session", next((o.session_id for o in unique if o.session_id), None)),
    ):
        if value:
            info.append(f"{label}={value}")
    tags = sorted({t for o in unique for t in o.tags})
    if tags:
        info.append(f"tags={tags}")
    if source.environment != "default":
        info.append(f"env={source.environment}")
    lines = [" ".join(info)]

    def walk(obs: Observation, prefix: str, last: bool) -> None:
        branch = "└─ " if last else "├─ "
        label = _describe(obs, duplicates.get(obs.id, 1))
        parent = obs.parent_observation_id
        if parent is not None and parent not in by_id and not obs.is_root:
            label += f" (parent {parent} not received)"
        lines.append(prefix + branch + label)
        kids = children.get(obs.id, [])
        for index, child in enumerate(kids):
            walk(child, prefix + ("   " if last else "│  "), index == len(kids) - 1)

    tops = children.get(None, [])
    for index, obs in enumerate(tops):
        walk(obs, "", index == len(tops) - 1)
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest + env


def receiver_env(receiver: LangfuseReceiver) -> dict[str, str]:
    """Environment variables that point a Langfuse client (or a subprocess) at ``receiver``."""
    return {
        "LANGFUSE_PUBLIC_KEY": receiver.public_key,
        "LANGFUSE_SECRET_KEY": receiver.secret_key,
        "LANGFUSE_BASE_URL": receiver.base_url,
    }


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - pytest is optional at runtime
    _pytest = None  # type: ignore[assignment]

if _pytest is not None:

    @_pytest.fixture
    def langfuse_receiver() -> Iterator[LangfuseReceiver]:
        """A started receiver with a public key unique to the test; stopped afterwards."""
        suffix = uuid.uuid4().hex[:12]
        with LangfuseReceiver(
            public_key=f"pk-lf-test-{suffix}", secret_key=f"sk-lf-test-{suffix}"
        ) as receiver:
            yield receiver

else:  # pragma: no cover

    def langfuse_receiver() -> Iterator[LangfuseReceiver]:
        """Placeholder: the fixture needs pytest."""
        raise RuntimeError("the langfuse_receiver fixture needs pytest installed")


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    """Run a standalone receiver until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m tracing.testing",
        description="Langfuse-compatible loopback receiver (OTLP ingestion + scores).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--public-key", default="pk-lf-test")
    parser.add_argument("--secret-key", default="sk-lf-test")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(message)s")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    receiver = LangfuseReceiver(
        public_key=args.public_key,
        secret_key=args.secret_key,
        host=args.host,
        port=args.port,
        max_request_bytes=args.max_request_bytes,
    )
    receiver.start()
    try:
        print(f"listening on {receiver.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

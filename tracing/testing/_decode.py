"""OTLP request bodies → :class:`Observation`, field by field as Langfuse v4 converts spans.

Mirrors langfuse/langfuse 4.16.0 (commit 6275144): the route
``web/src/pages/api/public/otel/v1/traces/index.ts`` (parsing, whole-batch id validation via
``validateOtelSpanIds`` in ``packages/shared/src/server/otel/utils.ts``) and
``OtelIngestionProcessor.processToEvent`` in ``packages/shared/src/server/otel/`` -- the
direct events path that ``x-langfuse-ingestion-version: 4`` selects
(``checkHeaderBasedDirectWrite`` in ``worker/src/queues/otelIngestionQueue.ts``).
Metadata values are JSON-decoded as the server's read path does
(``parseMetadataCHRecordToDomain``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ._model import Observation
from ._usage import cost_details, usage_details

__all__ = ["BadBatch", "decode_observations", "iter_spans", "parse_otlp", "validate_ids"]

A_TYPE = "langfuse.observation.type"
A_LEVEL = "langfuse.observation.level"
A_STATUS_MESSAGE = "langfuse.observation.status_message"
A_INPUT = "langfuse.observation.input"
A_OUTPUT = "langfuse.observation.output"
A_METADATA = "langfuse.observation.metadata"
A_MODEL = "langfuse.observation.model.name"
A_MODEL_PARAMETERS = "langfuse.observation.model.parameters"
A_COMPLETION_START = "langfuse.observation.completion_start_time"
A_TRACE_NAME = "langfuse.trace.name"
A_TRACE_TAGS = "langfuse.trace.tags"
A_TRACE_METADATA = "langfuse.trace.metadata"
A_ENVIRONMENT = "langfuse.environment"
A_RELEASE = "langfuse.release"
A_VERSION = "langfuse.version"
A_IS_APP_ROOT = "langfuse.internal.is_app_root"

_OTEL_STATUS_ERROR = 2
# parseObservationLevel: foreign level names mapped onto Langfuse's four.
_LEVEL_ALIASES = {
    "DEBUG": "DEBUG", "TRACE": "DEBUG", "VERBOSE": "DEBUG",
    "DEFAULT": "DEFAULT", "INFO": "DEFAULT", "LOG": "DEFAULT", "NOTICE": "DEFAULT",
    "OK": "DEFAULT", "SUCCESS": "DEFAULT",
    "WARNING": "WARNING", "WARN": "WARNING",
    "ERROR": "ERROR", "FATAL": "ERROR", "CRITICAL": "ERROR",
}
_MODEL_KEYS = (
    A_MODEL, "gen_ai.response.model", "ai.model.id", "gen_ai.request.model",
    "llm.response.model", "llm.model_name", "model",
)
_USER_KEYS = (
    "langfuse.user.id", "user.id", f"{A_METADATA}.langfuse_user_id",
    f"{A_TRACE_METADATA}.langfuse_user_id", "ai.telemetry.metadata.userId",
)
_SESSION_KEYS = (
    "langfuse.session.id", "session.id", "gen_ai.conversation.id",
    f"{A_METADATA}.langfuse_session_id", f"{A_TRACE_METADATA}.langfuse_session_id",
    "ai.telemetry.metadata.sessionId",
)
_TAG_KEYS = (
    A_TRACE_TAGS, "langfuse.tags", f"{A_METADATA}.langfuse_tags",
    f"{A_TRACE_METADATA}.langfuse_tags", "ai.telemetry.metadata.tags", "tag.tags",
)
_ENV_KEYS = (A_ENVIRONMENT, "deployment.environment.name", "deployment.environment")
_METADATA_EXCLUDED = frozenset({
    "ai.telemetry.metadata.userId", "ai.telemetry.metadata.sessionId",
    "ai.telemetry.metadata.tags", "ai.telemetry.metadata.langfusePrompt",
})


class BadBatch(Exception):
    """The batch is rejected as a whole (400), nothing of it is stored."""


# --------------------------------------------------------------------------- parsing


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


def parse_otlp(content_type: str, body: bytes) -> Any:
    """Parse an ExportTraceServiceRequest; raises BadBatch with the route's messages."""
    request = ExportTraceServiceRequest()
    if not content_type or (
        "application/json" not in content_type and "application/x-protobuf" not in content_type
    ):
        raise BadBatch("Invalid content type")
    if "application/x-protobuf" in content_type:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadBatch("Failed to parse OTel Protobuf Trace") from exc
        return request
    try:
        document = _hex_ids_to_base64(json.loads(body))
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (ValueError, AttributeError, TypeError, json_format.ParseError) as exc:
        raise BadBatch("Failed to parse OTel JSON Trace") from exc
    return request


def iter_spans(request: Any) -> Iterator[tuple[Any, Any, Any]]:
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield resource_spans, scope_spans, span


def validate_ids(request: Any) -> None:
    """validateOtelSpanIds: a span without a traceId or spanId rejects the whole export.

    Protobuf bytes are "absent" only when empty; any present id converts (the server does
    not check length or zeroes), so only an empty one is rejected.
    """
    reasons: dict[str, int] = {}
    total = 0
    for _, _, span in iter_spans(request):
        total += 1
        for field, value in (("traceId", span.trace_id), ("spanId", span.span_id)):
            if not value:
                reasons[f"{field}:absent"] = reasons.get(f"{field}:absent", 0) + 1
    if reasons:
        invalid = max(reasons.values())
        raise BadBatch(
            f"Invalid OTLP trace export: {invalid} of {total} span(s) cannot be processed "
            f"({', '.join(reasons)}). traceId and spanId are required on every span, and each "
            "must be a string or a byte array. The entire export was rejected and no spans "
            "were ingested."
        )


# --------------------------------------------------------------------------- attributes


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes_of(key_values: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def maybe_json(value: Any) -> Any:
    """JSON-decode a string when it is valid JSON; anything else is returned unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _first_truthy(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if attributes.get(key):
            return _text(attributes[key])
    return None


def metadata(attributes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """extractMetadata: the JSON object under ``prefix`` (else ``langfuse.metadata``), then
    every ``prefix.<key>`` / ``langfuse.metadata.<key>`` / ``ai.telemetry.metadata.<key>``
    attribute; a non-object top-level value is dropped. Values JSON-decoded (read path)."""
    primary = attributes.get(prefix)
    top = maybe_json(primary or attributes.get("langfuse.metadata"))
    out: dict[str, Any] = dict(top) if isinstance(top, dict) else {}
    for key, value in attributes.items():
        for name in (prefix, "langfuse.metadata", "ai.telemetry.metadata"):
            if key.startswith(name + ".") and key not in _METADATA_EXCLUDED and key[len(name) + 1:]:
                out[key[len(name) + 1:]] = maybe_json(value)
    return out


def tags(attributes: Mapping[str, Any]) -> list[str]:
    """extractTags: first truthy tag attribute; a list, a JSON list, comma-separated, or one."""
    value = next((attributes[k] for k in _TAG_KEYS if attributes.get(k)), None)
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.strip().startswith("["):
        parsed = maybe_json(value)
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    if isinstance(value, str):
        return [t.strip() for t in value.split(",")] if "," in value else [value]
    return []


def environment(attributes: Mapping[str, Any], resource: Mapping[str, Any]) -> str:
    """extractEnvironment + normalizeEnvironment: lower-cased, no ``langfuse`` prefix."""
    for key in _ENV_KEYS:
        for source in (attributes, resource):
            if source.get(key):
                value = str(source[key]).lower()
                while value.startswith("langfuse"):
                    value = value[len("langfuse"):].lstrip("-_")
                value = value[:40]
                ok = value and all((c.isalnum() and c.isascii()) or c in "-_" for c in value)
                return value if ok else "default"
    return "default"


def _millis(nanos: int) -> datetime | None:
    """convertNanoTimestampToISO: nanoseconds floored to whole milliseconds; 0 is absent."""
    if not nanos:
        return None
    return datetime.fromtimestamp((nanos // 1_000_000) / 1000, tz=UTC)


def _completion_start(value: Any) -> datetime | None:
    decoded = maybe_json(value)
    if not isinstance(decoded, str):
        return None
    try:
        parsed = datetime.fromisoformat(decoded.replace("Z", "+00:00"))
    except ValueError:
        return None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _name(span_name: str, attributes: Mapping[str, Any]) -> str:
    """extractName: GenAI tool name, Genkit, Logfire and AI SDK names over the span name."""
    for key in ("gen_ai.tool.name", "logfire.msg"):
        if attributes.get(key):
            return _text(attributes[key])
    if "genkit:name" in attributes:
        return str(attributes["genkit:name"])
    if "ai.toolCall.name" in attributes:
        return str(attributes["ai.toolCall.name"])
    if "ai.operationId" in attributes:
        prefix = attributes.get("ai.telemetry.functionId")
        return (f"{prefix}:" if prefix else "") + str(attributes["ai.operationId"])
    return span_name


def _decode_span(span: Any, scope: Any, resource: dict[str, Any], at: float) -> Observation:
    attrs = attributes_of(span.attributes)
    parent = span.parent_span_id.hex() if span.parent_span_id else None
    model = _first_truthy(attrs, _MODEL_KEYS)
    level = _LEVEL_ALIASES.get(str(attrs.get(A_LEVEL, "")).strip().upper()) or (
        "ERROR" if span.status.code == _OTEL_STATUS_ERROR else "DEFAULT"
    )
    status_message = attrs.get(A_STATUS_MESSAGE)
    if status_message is None and span.status.message:
        status_message = span.status.message
    start, end = _millis(span.start_time_unix_nano), _millis(span.end_time_unix_nano)
    start = start or end or datetime.now(UTC).replace(microsecond=0)
    trace_metadata = metadata(attrs, A_TRACE_METADATA)
    is_app_root = attrs.get(A_IS_APP_ROOT) in (True, "true")
    model_parameters = maybe_json(attrs.get(A_MODEL_PARAMETERS))
    release = attrs.get(A_RELEASE) or resource.get(A_RELEASE)
    version = attrs.get(A_VERSION) or resource.get("service.version")
    return Observation(
        id=span.span_id.hex(),
        trace_id=span.trace_id.hex(),
        parent_observation_id=parent,
        name=_name(span.name, attrs),
        type=str(attrs.get(A_TYPE) or ("generation" if model is not None else "span")),
        level=level,
        status_message=None if status_message is None else str(status_message),
        input=maybe_json(attrs.get(A_INPUT)),
        output=maybe_json(attrs.get(A_OUTPUT)),
        metadata={**metadata(attrs, A_METADATA), **trace_metadata},
        model=model,
        model_parameters=model_parameters if isinstance(model_parameters, dict) else None,
        usage_details=usage_details(attrs),
        cost_details=cost_details(attrs),
        completion_start_time=_completion_start(attrs.get(A_COMPLETION_START)),
        start_time=start,
        end_time=end or start,
        environment=environment(attrs, resource),
        release=None if release is None else str(release),
        version=None if version is None else str(version),
        user_id=_first_truthy(attrs, _USER_KEYS),
        session_id=_first_truthy(attrs, _SESSION_KEYS),
        tags=tags(attrs),
        trace_name=str(attrs[A_TRACE_NAME]) if attrs.get(A_TRACE_NAME) else None,
        trace_metadata=trace_metadata,
        is_root=parent is None or is_app_root,
        status_code=int(span.status.code),
        kind=int(span.kind),
        scope_name=scope.name,
        scope_version=scope.version,
        attributes=attrs,
        resource_attributes=resource,
        received_at=at,
        is_app_root=is_app_root,
    )


def decode_observations(request: Any, received_at: float) -> list[Observation]:
    out: list[Observation] = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(_decode_span(span, scope_spans.scope, resource, received_at))
    return out

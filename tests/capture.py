"""A real Langfuse client whose spans land in memory, for tests of code that records spans."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from langfuse import Langfuse
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracing import _sdk
from tracing.testing import Observation, Trace, observations_from_otlp, trace_from


@dataclass
class Captured:
    """A real Langfuse client whose spans land in memory."""

    langfuse: Langfuse
    exporter: InMemorySpanExporter

    def spans(self, observation_type: str | None = None) -> list[ReadableSpan]:
        """Every finished span, or only those of one Langfuse observation type."""
        self.langfuse.flush()
        return [
            s
            for s in self.exporter.get_finished_spans()
            if observation_type is None
            or (s.attributes or {}).get("langfuse.observation.type") == observation_type
        ]

    def only(self, observation_type: str) -> list[ReadableSpan]:
        return self.spans(observation_type)

    def observations(self) -> list[Observation]:
        """The finished spans as Langfuse v4 stores them (tracing.testing's rules), in order."""
        return observations_from_otlp(encode_spans(self.spans()), time.monotonic())

    def trace(self, trace_id: str) -> Trace:
        """One trace as Langfuse v4 shows it: name, input, output, metadata, roots."""
        observations = [o for o in self.observations() if o.trace_id == trace_id]
        if not observations:
            raise KeyError(trace_id)
        return trace_from(trace_id, observations)


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A Langfuse client (unique public key) exporting to an in-memory exporter."""
    public_key = f"pk-test-{uuid.uuid4().hex[:8]}"
    exporter = InMemorySpanExporter()
    langfuse = Langfuse(
        public_key=public_key,
        secret_key="sk-test",
        base_url="http://127.0.0.1:9",
        span_exporter=exporter,
        tracer_provider=TracerProvider(),
    )
    yield Captured(langfuse, exporter)
    langfuse.shutdown()
    # The SDK keeps one resource manager per key per process; forget ours so get_client()
    # elsewhere in the test session is not confused by leftovers.
    _sdk.forget_client(public_key)

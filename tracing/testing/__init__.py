"""A Langfuse-compatible loopback receiver for tests and demos, following the v4 server.

No Langfuse server can run in a plain CI job, yet the interesting failures of a tracing
integration (lost spans, duplicates, broken parent links, retries against an overloaded
server) only show up when real spans travel over real HTTP. :class:`LangfuseReceiver` is a
small HTTP server on loopback that speaks the part of Langfuse's public API the SDK and an
OTLP shipper talk to, and stores what it accepts the way the Langfuse server does.

**Server version mirrored: langfuse/langfuse 4.16.0** (``v4.16.0-30-g6275144614``, commit
6275144 of 2026-08-22), the v4 direct events path selected by the header
``x-langfuse-ingestion-version: 4``. Each module names the server files it follows:

* ``_decode`` -- OTLP (protobuf or JSON, gzip) → :class:`Observation`, field by field
  (``OtelIngestionProcessor.processToEvent``): ids, parent, name, type, level, status
  message, model, usage/cost (``_usage``), millisecond times, environment, release, version,
  user, session, tags, metadata with the propagated trace metadata merged in.
* ``_traces`` -- the trace rules (``eventsTable.ts``, ``event-query-builder.ts``): a span is
  a root when its parent span id is empty or it carries ``langfuse.internal.is_app_root``;
  the trace's name is the last ``langfuse.trace.name`` set, else the name of the root that
  arrived last; its input, output and metadata come only from the last span with an EMPTY
  parent span id. :meth:`LangfuseReceiver.trace` returns that view as a :class:`Trace`.
* ``_receiver`` / ``_routing`` / ``_ingestion`` -- status codes: 401/403 for auth and
  suspension, 400 for a batch with a span lacking ids, a bad body or an ingestion version
  above 4, 200 otherwise; no 413 (the server only logs above 16 MB) unless a test opts into a
  proxy's limit with ``max_request_bytes=``. ``/api/public/ingestion`` answers 207 with
  per-event results (events_only mode: scores and SDK logs only), ``/api/public/scores``
  takes the v5 SDK's batches; scores land in :attr:`LangfuseReceiver.scores`.
* ``_faults`` -- fault injection at any time from any thread: :meth:`~LangfuseReceiver.
  fail_next` (e.g. 429 with ``Retry-After``), :meth:`~LangfuseReceiver.set_fail_rate`
  (seeded), :meth:`~LangfuseReceiver.set_latency`, :meth:`~LangfuseReceiver.set_auth_keys`
  (key rotation), :meth:`~LangfuseReceiver.set_poison` (whole-batch 400 for a span matching a
  predicate), :meth:`~LangfuseReceiver.set_suspended` (403) and
  :meth:`~LangfuseReceiver.down` / :meth:`~LangfuseReceiver.up` (refused, then the same port).
* ``_experiments`` / ``_datasets`` -- experiments as the server reads them from spans
  (``OtelIngestionProcessor.extractExperimentFields``): :func:`experiment_fields` of one
  observation, :meth:`~LangfuseReceiver.experiment_items` (the spans that are their item's
  root, as the experiments API lists items); and the two dataset routes
  ``Langfuse.get_dataset`` calls (``GET /api/public/v2/datasets/{name}``, ``GET
  /api/public/dataset-items``), serving what a test put in with
  :meth:`~LangfuseReceiver.add_dataset`.
* ``_render`` -- :meth:`~LangfuseReceiver.tree` / :meth:`~LangfuseReceiver.format_traces`
  print each trace with the name, input and output Langfuse shows, then its tree.
* ``plugin`` -- the ``langfuse_receiver`` pytest fixture, registered by the ``pytest11``
  entry point: installed, it needs no conftest.

Not mirrored: tokenising and pricing from Langfuse's model table, media extraction, the
third-party framework mappings beyond GenAI usage keys, and metadata's ``resourceAttributes``
/ ``scope`` keys (kept apart in ``Observation.resource_attributes`` / ``scope_name``).

Usage::

    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider
    from tracing.testing import LangfuseReceiver

    with LangfuseReceiver(public_key="pk-lf-mytest") as receiver:
        client = Langfuse(public_key="pk-lf-mytest", secret_key="sk-lf-test",
                          base_url=receiver.base_url, tracer_provider=TracerProvider())
        with client.start_as_current_observation(name="job", input={"q": 1}):
            pass
        client.flush()
        [job] = receiver.wait_for_count(1, name="job")
        trace = receiver.trace(job.trace_id)
        assert trace.name == "job" and trace.input == {"q": 1}
        print(receiver.tree(job.trace_id))

Waiting never sleeps: :meth:`LangfuseReceiver.wait_for` blocks on a condition variable
notified whenever spans are stored, and fails saying what it waited for and what arrived.

Run standalone (for demos, or to watch a worker from another terminal)::

    python -m tracing.testing --port 3000 --public-key pk-lf-demo --secret-key sk-lf-demo

It prints ``listening on http://127.0.0.1:3000`` and serves ``GET /_receiver/observations``
and ``/_receiver/traces`` (JSON), ``GET /_receiver/tree`` (text), ``GET /_receiver/requests``,
``GET /_receiver/scores``, ``GET /_receiver/duplicates``, ``POST /_receiver/clear`` and
``POST /_receiver/datasets`` (``{"name": ..., "items": [...]}``: a dataset to serve).
"""

from __future__ import annotations

from collections.abc import Iterator

from ._cli import main, receiver_env
from ._datasets import DATASET_ITEMS_PATH, DATASETS_PATH
from ._decode import decode_observations as observations_from_otlp
from ._experiments import ExperimentFields, experiment_fields
from ._model import Observation, ReceivedRequest, Trace
from ._receiver import (
    HEALTH_PATH,
    INGESTION_PATH,
    MAX_INGESTION_VERSION,
    PROJECTS_PATH,
    SCORES_PATH,
    LangfuseReceiver,
)
from ._state import TRACES_PATH
from ._traces import build_trace as trace_from
from ._traces import is_root

try:
    from .plugin import langfuse_receiver
except ImportError:  # pragma: no cover - pytest is optional at runtime

    def langfuse_receiver() -> Iterator[LangfuseReceiver]:  # type: ignore[misc]
        """Placeholder: the fixture needs pytest."""
        raise RuntimeError("the langfuse_receiver fixture needs pytest installed")


SERVER_VERSION = "4.16.0"

__all__ = [
    "DATASETS_PATH",
    "DATASET_ITEMS_PATH",
    "HEALTH_PATH",
    "INGESTION_PATH",
    "MAX_INGESTION_VERSION",
    "PROJECTS_PATH",
    "SCORES_PATH",
    "SERVER_VERSION",
    "TRACES_PATH",
    "ExperimentFields",
    "LangfuseReceiver",
    "Observation",
    "ReceivedRequest",
    "Trace",
    "experiment_fields",
    "is_root",
    "langfuse_receiver",
    "main",
    "observations_from_otlp",
    "receiver_env",
    "trace_from",
]

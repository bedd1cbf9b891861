"""A minimal OTLP sink: what a Langfuse ingestion front end does before it queues a batch.

Checks Basic auth, gunzips, parses the protobuf ``ExportTraceServiceRequest`` and counts
span ids, then answers 200 ``{}`` like Langfuse. ``tracing.testing.LangfuseReceiver`` also
decodes every span into an ``Observation`` in Python, which makes it, not the shipper, the
bottleneck of a throughput measurement; this sink shows what the shipper itself can do.

Run: ``python -m bench._sink --port P --public-key K --secret-key S``; it prints
``listening`` and serves ``GET /_sink/stats`` (``{"requests", "spans", "unique"}``).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

TRACES_PATH = "/api/public/otel/v1/traces"


class _State:
    def __init__(self, auth: str) -> None:
        self.auth = auth
        self.lock = threading.Lock()
        self.requests = 0
        self.spans = 0
        self.ids: set[bytes] = set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm holds the
        # body until the client's delayed ACK (40 ms per request on Linux loopback).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.state.lock:
            stats = {"requests": self.state.requests, "spans": self.state.spans,
                     "unique": len(self.state.ids)}
        self._answer(200, json.dumps(stats).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != TRACES_PATH or self.headers.get("Authorization") != self.state.auth:
            self._answer(401, b'{"message": "unauthorized"}')
            return
        if "gzip" in self.headers.get("Content-Encoding", ""):
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        ids = [span.span_id for rs in request.resource_spans for ss in rs.scope_spans
               for span in ss.spans]
        with self.state.lock:
            self.state.requests += 1
            self.state.spans += len(ids)
            self.state.ids.update(ids)
        self._answer(200, b"{}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._sink")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--secret-key", required=True)
    args = parser.parse_args()
    token = base64.b64encode(f"{args.public_key}:{args.secret_key}".encode()).decode()
    _Handler.state = _State(f"Basic {token}")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

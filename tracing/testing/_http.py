"""HTTP plumbing: the threaded server, the request handler, reading bodies, answering."""

from __future__ import annotations

import json
import logging
import socket
import socketserver
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Abort", "Handler", "Server", "Server6", "read_body", "send", "send_json"]

logger = logging.getLogger("tracing.testing")

# Bodies above this are not even drained: the connection is answered and closed.
_DRAIN_LIMIT_BYTES = 256 * 1024 * 1024


class Abort(Exception):
    """The receiver went down while answering: drop the connection without an answer."""


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    receiver: Any  # the LangfuseReceiver serving on this socket
    generation: int

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can stall.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class Server6(Server):
    address_family = socket.AF_INET6


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

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


def read_body(handler: Handler, limit: int | None) -> tuple[bytes, bool]:
    """Read the request body; returns (body, too_large). Oversized bodies are drained."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        return _read_chunked(handler, limit)
    try:
        length = max(0, int(handler.headers.get("Content-Length") or 0))
    except ValueError:
        handler.close_connection = True  # cannot find the end of this request
        return b"", False
    if limit is not None and length > limit:
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


def _read_chunked(handler: Handler, limit: int | None) -> tuple[bytes, bool]:
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
        if limit is None or total <= limit:
            parts.append(chunk)
    too_large = limit is not None and total > limit
    return (b"", True) if too_large else (b"".join(parts), False)


def send(
    handler: Handler,
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


def send_json(handler: Handler, status: int, document: Any) -> None:
    send(handler, status, json.dumps(document).encode(), "application/json")

"""The HTTP seam: one POST of an OTLP body to Langfuse, answered as a ``SendResult``.

Same auth and headers as the Langfuse SDK's own exporter (``Authorization: Basic``,
``x-langfuse-sdk-*``, ``x-langfuse-public-key``, ``x-langfuse-ingestion-version: 4``), gzip
protobuf. Tests inject an ``httpx.MockTransport`` (``HttpTransport(config, transport=...)``)
or any object with ``send`` / ``close`` (``Transport``).
"""

from __future__ import annotations

import base64
import gzip
import time
from typing import Protocol

import httpx

from tracing._config import Config
from tracing.shipping._delivery import SendResult, parse_retry_after

# Raised before a byte of the request can have reached the server: nothing can be stored.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
             httpx.UnsupportedProtocol, httpx.LocalProtocolError)


class Transport(Protocol):
    def send(self, body: bytes, timeout: float) -> SendResult: ...

    def close(self) -> None: ...


def headers_for(config: Config) -> dict[str, str]:
    """The SDK exporter's headers for ``config``'s keys."""
    from langfuse._version import __version__ as sdk_version

    token = base64.b64encode(f"{config.public_key}:{config.secret_key}".encode()).decode()
    return {
        "Authorization": f"Basic {token}",
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "gzip",
        "x-langfuse-sdk-name": "python",
        "x-langfuse-sdk-version": sdk_version,
        "x-langfuse-public-key": config.public_key or "",
        "x-langfuse-ingestion-version": "4",
        "User-Agent": "celery-langfuse",
    }


class HttpTransport:
    """POSTs gzip OTLP protobuf to ``config.traces_endpoint``.

    gzip level 1: twice as fast as level 5 on span batches for a few percent more bytes
    (bench/shipping.py), and the shipper's CPU is the worker host's.
    """

    def __init__(
        self, config: Config, *, transport: httpx.BaseTransport | None = None,
        compresslevel: int = 1, endpoint: str | None = None,
        headers: dict[str, str] | None = None, compress: bool = True, max_body: int = 500,
    ) -> None:
        # endpoint / headers / compress / max_body: another Langfuse route through the same
        # seam (scores: JSON to /api/public/ingestion, whose 207 body is read whole).
        self.endpoint = endpoint or config.traces_endpoint
        self.compresslevel = compresslevel
        self.compress = compress
        self.max_body = max_body
        self._client = httpx.Client(headers=headers or headers_for(config), transport=transport)

    def send(self, body: bytes, timeout: float) -> SendResult:
        content = gzip.compress(body, compresslevel=self.compresslevel) if self.compress else body
        try:
            response = self._client.post(self.endpoint, content=content, timeout=timeout)
        except httpx.HTTPError as exc:
            return SendResult(None, error=f"{type(exc).__name__}: {exc}",
                              maybe_sent=not isinstance(exc, _NOT_SENT))
        return SendResult(
            response.status_code,
            retry_after=parse_retry_after(response.headers.get("Retry-After"), time.time()),
            body=response.text[: self.max_body],
        )

    def close(self) -> None:
        self._client.close()

"""``python -m tracing.testing``: a standalone receiver for demos and benchmarks."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from ._receiver import LangfuseReceiver

__all__ = ["main", "receiver_env"]


def receiver_env(receiver: LangfuseReceiver) -> dict[str, str]:
    """Environment variables that point a Langfuse client (or a subprocess) at ``receiver``."""
    return {
        "LANGFUSE_PUBLIC_KEY": receiver.public_key,
        "LANGFUSE_SECRET_KEY": receiver.secret_key,
        "LANGFUSE_BASE_URL": receiver.base_url,
    }


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
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="answer 413 above this many bytes, like a proxy (default: no limit)")
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

"""The receiver's shared state and its lifecycle: bind, serve, stop, come back on the port."""

from __future__ import annotations

import base64
import contextlib
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from ._http import Handler, Server, Server6
from ._model import Observation, ReceivedRequest

if TYPE_CHECKING:
    from ._faults import Fault

__all__ = ["TRACES_PATH", "PoisonPredicate", "ReceiverState"]

TRACES_PATH = "/api/public/otel/v1/traces"
PoisonPredicate = Callable[[dict[str, Any]], bool]


class ReceiverState:
    """Everything the receiver keeps, one lock guarding it, and start/stop."""

    def __init__(
        self,
        public_key: str = "pk-lf-test",
        secret_key: str = "sk-lf-test",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_request_bytes: int | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._max_request_bytes = max_request_bytes
        self._cond = threading.Condition(threading.RLock())
        self._public_key = public_key
        self._secret_key = secret_key
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._down_event = threading.Event()
        self._connections: set[socket.socket] = set()
        self._observations: list[Observation] = []
        self._id_counts: Counter[str] = Counter()
        self._requests: list[ReceivedRequest] = []
        self._scores: list[dict[str, Any]] = []
        self._ingestion_events: list[dict[str, Any]] = []
        self._faults: list[Fault] = []
        self._fail_rate = 0.0
        self._fail_rate_fault: Fault | None = None
        self._rng = random.Random(0)
        self._latency = 0.0
        self._poison: PoisonPredicate | None = None
        self._suspended = False
        self._in_flight = 0

    def start(self) -> Self:
        """Bind (the same port as before, after a stop) and serve in a daemon thread."""
        with self._cond:
            if self._server is not None:
                return self
            server_class = Server6 if ":" in self._host else Server
            server = server_class((self._host, self._port), Handler)
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

    def __enter__(self) -> Self:
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
    def max_request_bytes(self) -> int | None:
        """The opt-in body limit answered with 413 (None: no limit, as the server)."""
        return self._max_request_bytes

    def auth_header(self) -> str:
        """The ``Authorization`` header value the receiver currently accepts."""
        with self._cond:
            token = f"{self._public_key}:{self._secret_key}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

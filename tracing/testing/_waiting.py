"""Waiting without sleeping: a condition variable notified whenever something is stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ._model import Observation, Trace
from ._queries import Queries
from ._traces import build_trace

__all__ = ["Waiting"]


class Waiting(Queries):
    """``wait_for*``: block until what a test needs has arrived, or fail saying what did."""

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

    def wait_for_trace(
        self,
        trace_id: str,
        predicate: Callable[[Trace], Any] | None = None,
        timeout: float = 30.0,
    ) -> Trace:
        """Wait until the trace exists (and ``predicate(trace)`` holds); return its v4 view."""
        found: list[Trace] = []

        def ready(observations: list[Observation]) -> bool:
            arrived = [o for o in observations if o.trace_id == trace_id]
            if not arrived:
                return False
            trace = build_trace(trace_id, arrived)
            if predicate is not None and not predicate(trace):
                return False
            found.append(trace)
            return True

        self.wait_for(ready, timeout=timeout, what=f"trace {trace_id}")
        return found[-1]

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

"""Fault injection: failures, random failure rates, latency, key rotation, poison, suspension."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from typing import Any

from ._state import PoisonPredicate, ReceiverState

__all__ = ["Fault", "FaultInjection"]


@dataclasses.dataclass(frozen=True)
class Fault:
    status: int
    retry_after: str | None
    body: bytes
    content_type: str


class FaultInjection(ReceiverState):
    """Setters a test calls at any time, from any thread, to make the receiver misbehave."""

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

    def set_suspended(self, suspended: bool = True) -> None:
        """Answer ingestion with 403 "Ingestion suspended", as Langfuse does for a project
        past its usage threshold (valid keys; nothing stored)."""
        with self._cond:
            self._suspended = bool(suspended)

    def reset_faults(self) -> None:
        """Drop queued failures, the failure rate, latency, poison and suspension."""
        with self._cond:
            self._faults.clear()
            self._fail_rate = 0.0
            self._fail_rate_fault = None
            self._latency = 0.0
            self._poison = None
            self._suspended = False

    @staticmethod
    def _make_fault(
        status: int,
        retry_after: float | str | None,
        body: str | bytes | Mapping[str, Any] | None,
    ) -> Fault:
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
        return Fault(status, header, payload, content_type)

    def _take_fault(self) -> Fault | None:
        with self._cond:
            if self._faults:
                return self._faults.pop(0)
            if self._fail_rate_fault is not None and self._rng.random() < self._fail_rate:
                return self._fail_rate_fault
            return None

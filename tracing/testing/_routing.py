"""What every endpoint shares: recording requests, authentication, latency, liveness.

Authentication answers as langfuse/langfuse 4.16.0 (commit 6275144) does in
``web/src/features/public-api/server/createAuthedProjectAPIRoute.ts`` and ``apiAuth.ts``:
no header → 401 ``No authorization header``; wrong Basic keys → 401 ``Invalid credentials.
Confirm that you've configured the correct host.``; neither Basic nor Bearer → 401 ``Invalid
authorization header``; ``Bearer <public key>`` (scores-only access) on a project route → 403;
a suspended project (:meth:`set_suspended`) → 403 ``Ingestion suspended: ...``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from ._http import Abort, Handler, send_json
from ._model import ReceivedRequest
from ._waiting import Waiting

__all__ = ["SUSPENDED", "Routing"]

SUSPENDED = "Ingestion suspended: Usage threshold exceeded. Please upgrade your plan."
_INVALID_KEYS = "Invalid credentials. Confirm that you've configured the correct host."


class Routing(Waiting):
    """Helpers the endpoint handlers call; none of them is public."""

    def _record(self, handler: Handler, method: str, status: int, **fields: Any) -> None:
        request = ReceivedRequest(
            at=fields.pop("at"),
            method=method,
            path=handler.path.split("?", 1)[0],
            status=status,
            span_count=fields.pop("span_count", 0),
            span_ids=tuple(fields.pop("span_ids", ())),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body_bytes=fields.pop("body_bytes", 0),
            note=fields.pop("note", ""),
        )
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def _auth_error(self, handler: Handler, scores_allowed: bool = False) -> tuple[int, str] | None:
        """(status, message) when the Authorization header does not admit this request."""
        header = handler.headers.get("Authorization")
        if not header:
            return 401, "No authorization header"
        with self._cond:
            expected_pk, expected_sk = self._public_key, self._secret_key
        if header.startswith("Bearer "):
            matches = hmac.compare_digest(header[7:].strip().encode(), expected_pk.encode())
            if not matches:
                return 401, _INVALID_KEYS
            if scores_allowed:
                return None
            return 403, "Access denied - insufficient permissions for this endpoint"
        if not header.startswith("Basic "):
            return 401, "Invalid authorization header"
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return 401, _INVALID_KEYS
        public_key, sep, secret_key = decoded.partition(":")
        valid = (
            bool(sep)
            and hmac.compare_digest(public_key.encode(), expected_pk.encode())
            and hmac.compare_digest(secret_key.encode(), expected_sk.encode())
        )
        return None if valid else (401, _INVALID_KEYS)

    def _check_auth(
        self,
        handler: Handler,
        method: str,
        at: float,
        *,
        scores_allowed: bool = False,
        named_errors: bool = False,
        **fields: Any,
    ) -> bool:
        """Answer 401/403 (and record it) unless the request is authorised and not suspended.

        ``named_errors``: the body also names the error class, as ``/api/public/ingestion``
        answers (the project routes do that only for the suspension's ForbiddenError).
        """
        problem = self._auth_error(handler, scores_allowed)
        suspended = False
        if problem is None:
            with self._cond:
                if not self._suspended:
                    return True
            problem, suspended = (403, SUSPENDED), True
        status, message = problem
        self._record(handler, method, status, at=at, note=message, **fields)
        body = {"message": message}
        if suspended or named_errors:
            body["error"] = "UnauthorizedError" if status == 401 else "ForbiddenError"
        send_json(handler, status, body)
        return False

    def _apply_latency(self, generation: int) -> None:
        with self._cond:
            latency, down = self._latency, self._down_event
        if latency > 0:
            down.wait(latency)
        self._check_alive(generation)

    def _check_alive(self, generation: int) -> None:
        with self._cond:
            if generation != self._generation or self._server is None:
                raise Abort

    def _reject(self, handler: Handler, fields: dict[str, Any], message: str) -> None:
        self._record(handler, "POST", 400, note=message, **fields)
        send_json(handler, 400, {"error": message})

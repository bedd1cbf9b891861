"""Errors raised by the LLM client; the Celery tasks retry only `RetryableLLMError`."""

from __future__ import annotations


class LLMError(Exception):
    """A model call failed in a way retrying will not fix (bad request, auth, bad reply)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RetryableLLMError(LLMError):
    """A model call failed transiently (429, 5xx, timeout, network): try again later."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        # Seconds the server asked us to wait (Retry-After), when it said so.
        self.retry_after = retry_after


class LLMConfigError(ValueError):
    """An LLM_* environment variable has a value we cannot use."""

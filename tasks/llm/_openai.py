"""Provider for any OpenAI-compatible chat-completions endpoint, over httpx.

Error mapping decides what the Celery task retries: 408/409/429/5xx, timeouts and network
errors raise `RetryableLLMError`; any other 4xx and unparseable replies raise `LLMError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from ._errors import LLMError, RetryableLLMError
from ._tokens import count_message_tokens, count_tokens
from ._types import Message, ProviderReply

_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAIProvider:
    """Chat completions against `{base_url}/chat/completions`, optionally streamed."""

    name = "openai"

    def __init__(self, *, base_url: str, api_key: str | None, timeout: float) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        # Connecting should be quick; reading a long completion may take the whole budget.
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._http: httpx.Client | None = None
        self._pid = 0

    def _client(self) -> httpx.Client:
        # A connection pool must not cross fork: prefork children build their own.
        if self._http is None or self._pid != os.getpid():
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._http = httpx.Client(timeout=self._timeout, headers=headers)
            self._pid = os.getpid()
        return self._http

    def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        stream: bool = False,
    ) -> ProviderReply:
        """Send one chat-completions request and parse text, usage and model."""
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        try:
            if stream:
                return self._complete_streaming(body, messages)
            response = self._client().post(self._url, json=body)
            _raise_for_status(response)
            return _parse_completion(response, model)
        except httpx.TimeoutException as exc:
            raise RetryableLLMError(f"timeout calling {self._url}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise RetryableLLMError(f"network error calling {self._url}: {exc!r}") from exc

    def _complete_streaming(
        self, body: dict[str, Any], messages: Sequence[Message]
    ) -> ProviderReply:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with self._client().stream("POST", self._url, json=body) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_status(response)
            return _collect_stream(_sse_events(response), messages, body["model"])

    def close(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            self._http.close()
            self._http = None


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    message = f"HTTP {status} from {response.request.url}: {_error_text(response)}"
    if status in _RETRYABLE_STATUS or status >= 500:
        raise RetryableLLMError(message, status_code=status, retry_after=_retry_after(response))
    raise LLMError(message, status_code=status)


def _error_text(response: httpx.Response) -> str:
    """The server's error message (OpenAI's {"error": {"message": ...}}), else the raw body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return response.text[:500] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _parse_completion(response: httpx.Response, model: str) -> ProviderReply:
    try:
        data = response.json()
        text = data["choices"][0]["message"]["content"] or ""
        usage = data.get("usage") or {}
        return ProviderReply(
            text=text,
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            model=str(data.get("model") or model),
        )
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMError(f"malformed chat-completions reply: {exc!r}: {response.text[:200]}") from exc


def _sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """JSON payloads of a server-sent-events stream, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except json.JSONDecodeError as exc:
            raise LLMError(f"malformed stream chunk: {payload[:200]!r}") from exc


def _collect_stream(
    events: Iterator[dict[str, Any]], messages: Sequence[Message], model: str
) -> ProviderReply:
    parts: list[str] = []
    first_token: datetime | None = None
    usage: dict[str, Any] = {}
    for event in events:
        model = str(event.get("model") or model)
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                first_token = first_token or datetime.now(UTC)
                parts.append(delta)
    text = "".join(parts)
    # Servers that ignore stream_options send no usage: estimate it rather than report zero.
    return ProviderReply(
        text=text,
        input_tokens=int(usage.get("prompt_tokens") or count_message_tokens(messages)),
        output_tokens=int(usage.get("completion_tokens") or count_tokens(text)),
        model=model,
        completion_start_time=first_token,
    )

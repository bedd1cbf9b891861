"""A loopback OpenAI-compatible chat-completions server with scripted replies, for tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tasks.llm import OpenAIProvider


@dataclass
class Reply:
    """One scripted HTTP reply of the fake OpenAI server."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    sse: list[Any] | None = None  # when set, a text/event-stream of these JSON chunks


@dataclass
class FakeOpenAI:
    """A loopback OpenAI-compatible chat-completions server with scripted replies."""

    server: ThreadingHTTPServer
    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def provider(self, timeout: float = 5.0) -> OpenAIProvider:
        return OpenAIProvider(base_url=self.base_url, api_key="sk-fake", timeout=timeout)


def completion(text: str = "Hi there.", prompt: int = 11, output: int = 3) -> dict[str, Any]:
    """A chat-completions response body."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": 14},
    }


def _handler(fake: Callable[[], FakeOpenAI]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet."""

        def do_POST(self) -> None:
            """Record the request and send the next scripted reply."""
            server = fake()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.requests.append({"path": self.path, "headers": dict(self.headers), **body})
            reply = server.replies.pop(0) if server.replies else Reply(body=completion())
            time.sleep(reply.delay)
            if reply.sse is not None:
                payload = "".join(f"data: {json.dumps(c)}\n\n" for c in reply.sse)
                data = (payload + "data: [DONE]\n\n").encode()
                content_type = "text/event-stream"
            else:
                data = json.dumps(reply.body).encode()
                content_type = "application/json"
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A fake OpenAI-compatible server on 127.0.0.1, port chosen by the OS."""
    holder: list[FakeOpenAI] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(lambda: holder[0]))
    server.daemon_threads = True
    holder.append(FakeOpenAI(server))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()

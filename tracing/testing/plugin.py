"""The pytest plugin (entry point ``pytest11``): a ``langfuse_receiver`` fixture, no conftest.

Installing celery-langfuse registers it; a test just asks for ``langfuse_receiver``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ._receiver import LangfuseReceiver

__all__ = ["langfuse_receiver"]


@pytest.fixture
def langfuse_receiver() -> Iterator[LangfuseReceiver]:
    """A started receiver with a public key unique to the test; stopped afterwards.

    The Langfuse SDK keeps one client per public key per process: a key shared between
    tests would silently reuse the first test's client and URL.
    """
    suffix = uuid.uuid4().hex[:12]
    with LangfuseReceiver(
        public_key=f"pk-lf-test-{suffix}", secret_key=f"sk-lf-test-{suffix}"
    ) as receiver:
        yield receiver

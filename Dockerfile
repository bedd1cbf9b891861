# syntax=docker/dockerfile:1
#
# The celery-langfuse worker image: one Celery prefork worker (the `worker` app),
# tracing into Langfuse through a durable local spool.
#
#   docker build -t celery-langfuse-worker .
#   docker compose up          # see docker-compose.yml for the whole stack

# --- build: wheels for the project and all its dependencies -----------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# pyproject.toml names README.md as the project's readme: setuptools needs it.
COPY pyproject.toml README.md ./
COPY tracing/ tracing/
COPY worker/ worker/
COPY tasks/ tasks/

RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels .

# --- runtime -----------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    CELERY_LANGFUSE_SPOOL_DIR=/var/lib/celery-langfuse/spool

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels celery-langfuse

# Run as an unprivileged user. The spool directory is created here, owned by that
# user with mode 0700, so a fresh named volume mounted on it inherits both.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
 && mkdir -p /var/lib/celery-langfuse/spool \
 && chown -R app:app /var/lib/celery-langfuse \
 && chmod 0700 /var/lib/celery-langfuse/spool

USER app
WORKDIR /home/app

# Trace records wait here (durably) until the shipper has delivered them; keep it on
# a volume so a restarted container ships what the previous one left behind.
VOLUME ["/var/lib/celery-langfuse/spool"]

# Celery treats SIGTERM as a warm shutdown: stop taking tasks, finish the running
# ones, flush the spool, make one bounded last shipping attempt. Give the container
# time for that (docker-compose.yml sets stop_grace_period).
STOPSIGNAL SIGTERM

CMD ["celery", "-A", "worker", "worker", "-P", "prefork", "-c", "2", "--loglevel=INFO"]

"""A Django project's settings.py, as far as Celery sees it: upper-case names, Celery's own
and ours with the ``CELERY_`` prefix (loaded with ``config_from_object(...,
namespace="CELERY")``)."""

from __future__ import annotations

import os

DEBUG = False
INSTALLED_APPS = ["django.contrib.contenttypes"]  # not read by Celery: a settings module has more

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:1/1")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("TEST_QUEUE", "celery")
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# The privacy setting of issue 21: task inputs must not reach Langfuse.
CELERY_LANGFUSE_CAPTURE_INPUT = False
CELERY_LANGFUSE_EXCLUDE_TASKS = ["dj.excluded"]

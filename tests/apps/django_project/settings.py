"""settings.py of the minimal Django project: Django's own settings, Celery's, ours."""

SECRET_KEY = "test-only-not-secret"
INSTALLED_APPS: list[str] = []
USE_TZ = True

CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
CELERY_LANGFUSE_CAPTURE_INPUT = False
CELERY_LANGFUSE_SPOOL_MAX_BYTES = "100MB"
CELERY_LANGFUSE_EXCLUDE_TASKS = ["celery.*"]

"""The worker service: ``celery -A worker worker`` finds :data:`app` here."""

from worker.app import app

__all__ = ["app"]

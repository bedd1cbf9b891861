"""proj/celery.py as in Django's Celery guide, plus instrument(app)."""

from __future__ import annotations

import os

from celery import Celery

import tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.django_project.settings")

app = Celery("django_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
config = tracing.instrument(app)

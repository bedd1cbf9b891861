"""A Celery app set up the way Django's Celery guide does it: settings from a settings module
through ``namespace="CELERY"``, then ``instrument(app)``."""

from __future__ import annotations

from typing import Any

from celery import Celery

import tracing

app = Celery("django_style")
app.config_from_object("tests.apps.django_settings", namespace="CELERY")
tracing.instrument(app)


@app.task(name="dj.private")
def private(email: str, note: str) -> dict[str, Any]:
    return {"stored": len(note)}


@app.task(name="dj.excluded")
def excluded() -> str:
    return "not traced"

"""traced_app plus a task that makes a generation and then runs for a while (to be killed)."""

from __future__ import annotations

import time

from tests.apps.traced_app import _generation, app

__all__ = ["app"]


@app.task(name="t.long")
def long(seconds: float) -> float:
    _generation("before-the-kill", f"long {seconds}")
    time.sleep(seconds)
    return seconds

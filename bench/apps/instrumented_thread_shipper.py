"""``bench.apps.instrumented`` with the shipper in a thread of the worker's main process.

The previous placement (before the shipping process), kept so ``python -m bench.shipping
--placement`` can measure both in one run: ``_runtime.start`` is given ``ship="thread"``.
"""

from __future__ import annotations

import functools

from tracing.instrumentation import _runtime

_runtime.start = functools.partial(_runtime.start, ship="thread")

from bench.apps.instrumented import app, llm_task  # noqa: E402

__all__ = ["app", "llm_task"]

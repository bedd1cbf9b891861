"""Implementation 2: the Langfuse SDK's ``@observe`` alone, nothing done at shutdown."""

from __future__ import annotations

from bench.apps._common import make_app
from bench.apps._observed import register_task

app = make_app("bench_observe_only")
llm_task = register_task(app)

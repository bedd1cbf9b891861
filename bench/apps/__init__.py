"""One small Celery app per implementation the benchmark compares.

Every app registers the same task, ``bench.llm_task(i, work_ms)``: an LLM-like job that waits
``work_ms`` milliseconds (``time.sleep``: an LLM call is a network wait, not CPU work) and
records one Langfuse generation named ``llm`` (except the untraced app). Only the tracing
differs between modules, so their throughputs compare the tracing alone.
"""

"""The Celery side: where a task's span is made, and where it hangs in its trace.

The first stage of a span's path (Celery signal → record on disk → shipper → Langfuse):

* ``_instrument``: ``instrument(app)``, connecting the handlers to Celery's signals, once;
* ``_task_tracing``, ``_task_elsewhere``, ``_task_common``: the signal handlers (the process
  that runs the body; ends only the main process sees; what they share);
* ``_task_span``, ``_otel``: where a task's span hangs (derived ids, parents) and how it is made;
* ``_propagation``, ``_beat``: what a producer or ``celery beat`` puts into message headers;
* ``_options``, ``_payload``: per-task options, and the rendering of inputs and outputs;
* ``_client``, ``_runtime``: the Langfuse SDK wired to the spool, and the per-process runtime
  that decides who writes and who ships;
* ``_scores``, ``_urls``, ``_remote``: scores from anywhere, trace URLs, remote control.

It writes to ``tracing.spool`` and starts ``tracing.shipping``; neither imports it back
(an import-linter contract, ``make lint``).
"""

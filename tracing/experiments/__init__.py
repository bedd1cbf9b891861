"""Experiments on the worker fleet: a Langfuse dataset run as Celery tasks, durable and resumable.

Built on the other stages, not part of a span's path: each item is sent as a task (its span
made by ``tracing.instrumentation``, which reads the item's experiment header in
``_experiment_span``), and the evaluators' scores take the durable score path.

* ``_experiments``: ``run_experiment`` (``tracing.run_experiment``), the caller's loop;
* ``_experiment_items``: items, their derived task ids and the server's experiment ids;
* ``_experiment_ledger``: the run's progress kept in the result backend (what makes a second
  call resume);
* ``_experiment_results``: evaluators, results, and the summary;
* ``_cli``: ``celery -A app langfuse experiment``.
"""

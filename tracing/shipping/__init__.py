"""Shipping: reading the spool and delivering its records to Langfuse, under the delivery rules.

The last stage of a span's path (Celery signal → record on disk → shipper → Langfuse):

* ``_shipper``: the loop, and a map of where each delivery rule lives;
* ``_shipproc``, ``_shipper_main``: the shipper in a process of its own, supervised;
* ``_reader``: what the shipper reads: windows over segments, cursors, torn and corrupt
  records, the size cap, clean-up;
* ``_delivery``: the pure rules (status → verdict, back-off, Retry-After);
* ``_sending``, ``_score_sending``: one batch of spans / scores sent and acted upon;
* ``_transport``: the HTTP seam (one POST → ``SendResult``);
* ``_handoff``: records a stopping worker could not ship, handed to the deployment's Redis;
* ``_status``: the shipper's counters.

It imports ``tracing.spool`` and never the Celery side (an import-linter contract, ``make lint``).
"""

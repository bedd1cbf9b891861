"""``python -m tracing``: the operator CLI (see ``tracing._cli``)."""

from tracing._cli import main

main(prog_name="python -m tracing")

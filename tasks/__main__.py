"""`python -m tasks`: the producer CLI (see `tasks.cli`)."""

from .cli import main

main(prog_name="python -m tasks")

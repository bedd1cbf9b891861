"""Result rows: one JSON line each, printed and appended to ``bench/results.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_row(line: dict[str, Any], out: Path | None,
             rows: list[dict[str, Any]] | None = None) -> None:
    """Print ``line``, append it to ``out`` (if given), and keep it in ``rows`` (if given)."""
    if rows is not None:
        rows.append(line)
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        with out.open("a") as file:
            file.write(text + "\n")

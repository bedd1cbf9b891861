"""``python -m bench._drain SPOOL BASE_URL PUBLIC_KEY SECRET_KEY [--discard]``: one drain.

Runs ``bench.shipping.drain`` in a fresh interpreter and prints its result as JSON, so the
shipper is measured the way ``python -m tracing drain`` runs it, not inside the benchmark
process (whose large heap, left by the worker runs, made the same drain ~35% slower
through garbage-collection passes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.shipping import DiscardTransport, drain


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._drain")
    parser.add_argument("spool", type=Path)
    parser.add_argument("base_url")
    parser.add_argument("public_key")
    parser.add_argument("secret_key")
    parser.add_argument("--discard", action="store_true", help="gzip and drop, no network")
    args = parser.parse_args()
    transport = DiscardTransport() if args.discard else None
    result = drain(args.spool, args.base_url, (args.public_key, args.secret_key),
                   transport=transport)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

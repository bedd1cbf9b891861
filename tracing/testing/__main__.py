"""``python -m tracing.testing``: see :func:`tracing.testing.main`."""

import sys

from ._cli import main

sys.exit(main())

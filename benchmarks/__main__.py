"""``python -m benchmarks``: see :func:`benchmarks.cli.main` and ``--help``."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())

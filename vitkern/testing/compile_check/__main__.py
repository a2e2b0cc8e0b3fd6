"""``python -m vitkern.testing.compile_check``: see :mod:`vitkern.testing.compile_check`."""

import sys

from vitkern.testing.compile_check.runner import main

sys.exit(main())

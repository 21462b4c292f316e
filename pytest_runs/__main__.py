"""``python -m pytest_runs``: the same as the ``pytest-runs`` command."""

import sys

from .cli import main

sys.exit(main())

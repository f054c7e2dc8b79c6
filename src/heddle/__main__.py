"""``python -m heddle``: the ``heddle`` command."""

import sys

from heddle.cli import main

sys.exit(main())

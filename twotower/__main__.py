"""``python -m twotower``: the console script."""

import sys

from twotower.cli import main

sys.exit(main())

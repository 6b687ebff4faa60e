"""``python3 -m lab``: the same as ``scripts/lab``."""

import sys

from lab.cli import main

sys.exit(main())

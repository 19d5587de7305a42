"""``python -m heterocache ARGS`` = ``heterocache ARGS``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m heterocache.profile ARGS`` = ``heterocache profile ARGS``."""

import sys

from .cli import main

sys.exit(main())

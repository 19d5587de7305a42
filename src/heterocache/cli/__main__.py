"""``python -m heterocache.cli ARGS`` = ``heterocache ARGS``."""

import sys

from . import main

sys.exit(main())

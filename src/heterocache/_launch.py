"""Whether this interpreter was started as the ``heterocache`` command line.

``heterocache/__init__.py`` registers the attention implementation with transformers, which
imports torch and transformers (seconds). The command line skips that so that ``--help``,
``--version`` and ``profile list/show`` answer at once; its commands that run models import
:mod:`heterocache.engine.integration` themselves. Only the interpreter's own command line
(``sys.orig_argv``, which user code does not rewrite) decides, so a program that imports
heterocache always gets the registration.
"""

from __future__ import annotations

import sys

#: Modules whose ``python -m`` run is the command line.
CLI_MODULES = frozenset({"heterocache", "heterocache.cli"})
#: Names of the console script: pip's launcher on POSIX, its .exe and -script.py forms on Windows.
SCRIPT_NAMES = frozenset({"heterocache", "heterocache.exe", "heterocache-script.py"})
# Interpreter options that take the next word as their value (``-X importtime``, ``-W error``).
_OPTIONS_WITH_VALUE = frozenset({"-X", "-W", "--check-hash-based-pycs"})


def started_as_cli(argv: list[str] | None = None) -> bool:
    """True for ``heterocache ...`` (the console script) and ``python [options] -m heterocache ...``.

    Args:
        argv: the interpreter's command line (default ``sys.orig_argv``), interpreter first.
    """
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    words = iter(argv[1:])
    for word in words:
        if word in _OPTIONS_WITH_VALUE:
            next(words, None)
        elif word == "-m":
            return next(words, None) in CLI_MODULES
        elif word.startswith("-m") and not word.startswith("--"):
            return word[2:] in CLI_MODULES
        elif word == "-c" or word.startswith("-c") or word == "-":
            return False
        elif not word.startswith("-"):
            # either separator: the name is checked the same way whatever the platform
            return word.replace("\\", "/").rsplit("/", 1)[-1].lower() in SCRIPT_NAMES
    return False

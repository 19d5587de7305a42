"""`heterocache` command line: one sub-command group per feature module.

Each feature module exposes ``register(subparsers)`` that adds its sub-command(s) and sets
``func`` on the parsed namespace; this file only wires them together. Registration modules import
only the standard library: torch and transformers are imported inside the command functions that
need them, so ``--help``, ``--version`` and ``profile list`` answer at once, and every argument
is checked before any of that work (one-line errors, exit status 2; :mod:`heterocache.cli._argparse`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .._version import __version__
from ._argparse import ArgumentParser, HelpFormatter, dispatch, note_method_modules

# Feature modules that contribute sub-commands, in help order.
_COMMAND_MODULES = (
    "heterocache.profile.cli",
    "heterocache.eval.cli",
    "heterocache.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="heterocache", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"heterocache {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue  # feature not present in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    note_method_modules(argv)
    return dispatch(build_parser().parse_args(argv))

"""Optional dependencies (pyproject extras) with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""


def require_matplotlib(what: str = "plotting") -> ModuleType:
    """``matplotlib`` switched to the non-interactive Agg backend (no display needed).

    Raises:
        MissingExtraError: matplotlib is not installed (or not importable).
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as err:
        raise MissingExtraError(
            f'{what} needs matplotlib, which is not installed: pip install "heterocache[plot]"'
        ) from err
    matplotlib.use("Agg")
    return matplotlib

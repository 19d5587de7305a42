"""Lazy public names of a package: imported from their submodule on first use (module
``__getattr__``), so that importing the package (e.g. for the command line) stays light."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict, public: list[str]):
    """``(__getattr__, __dir__)`` for a package's module namespace.

    Args:
        package: the package's ``__name__``.
        exports: public name -> submodule (relative, e.g. ``"io.lookup"``) that defines it.
        namespace: the package's ``globals()``: a loaded name is stored there, so later look-ups
            skip ``__getattr__``.
        public: the package's ``__all__`` (listed by ``dir()``).
    """

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__

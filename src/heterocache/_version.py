"""The package version, in a module of its own so that ``heterocache --version`` and the build
(pyproject ``[tool.hatch.version]``) read it without importing torch."""

__version__ = "0.1.0"

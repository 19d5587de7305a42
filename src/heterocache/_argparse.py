"""argparse pieces shared by the sub-commands: a help formatter that shows defaults, and value
types that reject bad numbers while parsing (exit 2 with the reason, before any model loads).

Standard library only: the command line imports this for ``--help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default or
    there is nothing to show (None, False, an empty list); lists are shown comma-separated."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, (list, tuple)) and not default)
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (usage examples)."""


def bounded(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` checked against ``[low, high]`` (``(low, high]`` with
    ``low_open``), e.g. ``bounded(int, 1)`` for a count that must be at least 1."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_kind_name(kind)}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if too_low or too_high or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, low_open)}, got {text}")
        return value

    parse.__name__ = _kind_name(kind)  # argparse names the type in some messages
    return parse


def csv(item: Callable[[str], Any], container: type = list) -> Callable[[str], Any]:
    """An argparse ``type`` for comma-separated values, each parsed by ``item`` (empty items
    skipped); at least one value is required."""

    def parse(text: str):
        words = [w.strip() for w in text.split(",") if w.strip()]
        if not words:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        try:
            return container(item(w) for w in words)
        except argparse.ArgumentTypeError:
            raise
        except ValueError as err:
            name = getattr(item, "__name__", "value")
            raise argparse.ArgumentTypeError(f"expected comma-separated {name} values, got {text!r} ({err})") from None

    return parse


def text_value(value) -> str:
    """A method option as ``parse_method_spec`` reads it back."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return str(value)


def method_name(text: str) -> str:
    """An argparse ``type``: the registry name of a KV-cache method (aliases resolved; options
    as ``name:key=value:...`` kept, see ``heterocache.methods.parse_method_spec``), or an
    error listing the known ones. Imports the registry (torch, transformers) only when the option
    is given, which is still before the command loads a model."""
    from .methods import parse_method_spec

    try:
        name, params = parse_method_spec(text)
        return ":".join([name, *(f"{k}={text_value(v)}" for k, v in params.items())])
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number"}.get(kind, kind.__name__)


def _range(low, high, low_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}]"

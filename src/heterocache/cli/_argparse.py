"""argparse pieces shared by the sub-commands: a parser whose errors are one line, a help
formatter that shows defaults, value types that reject bad numbers while parsing, and the checks a
command runs after parsing (:class:`UsageError`, :func:`dispatch`). Every refusal is
``heterocache <command>: error: <reason>`` on one line with exit status 2, before any model loads
and, where the reason can be known without it, before torch is imported.

Standard library only: the command line imports this for ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE`` (exit status 2),
    without the usage block (``--help`` shows it); its sub-parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


class UsageError(ValueError):
    """A bad command-line request found after parsing (a file that does not exist, a profile that
    does not fit the model, ...): :func:`dispatch` reports it like an argparse error."""


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` as one line on stderr and exit with status 2."""
    text = " ".join(str(message).split())  # one line whatever the message
    print(f"{prog}: error: {text}", file=sys.stderr)
    raise SystemExit(2)


def command(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], Any],
            check: Callable[[argparse.Namespace], None] | None = None) -> None:
    """Make ``parser`` run ``func(args)``, after ``check(args)`` (which raises :class:`UsageError`
    for a bad request, before any heavy import or model loading; see :func:`dispatch`)."""
    parser.set_defaults(func=func, check=check, prog=parser.prog)


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command: its check first, then the command itself. A :class:`UsageError`
    from either (a command raises one for what it can check only after importing torch, before
    its model loads) becomes a one-line error and exit status 2."""
    try:
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
        return int(args.func(args) or 0)
    except UsageError as err:
        fail(getattr(args, "prog", "heterocache"), str(err))


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


#: What ``--methods-from`` names on this command line (found by :func:`note_method_modules` before
#: parsing): modules or files that register methods of their own, which the built-in table cannot know.
METHOD_MODULES: list[str] = []


def note_method_modules(argv: list[str]) -> None:
    """Remember the ``--methods-from`` values of ``argv``, so that :func:`method_name` lets a name
    it does not know through (the command checks it with the registry once they are imported)."""
    METHOD_MODULES.clear()
    for i, word in enumerate(argv):
        if word == "--methods-from" and i + 1 < len(argv):
            METHOD_MODULES.append(argv[i + 1])
        elif word.startswith("--methods-from="):
            METHOD_MODULES.append(word.partition("=")[2])


def method_name(text: str) -> str:
    """An argparse ``type``: the registry name of a KV-cache method (aliases resolved; options
    as ``name:key=value:...`` kept, see ``heterocache.engine.registry.parse_method_spec``), or an
    error listing the known ones. Checked against :mod:`heterocache._method_names`, without
    importing the registry (torch, transformers).

    Raises:
        ModuleNotFoundError: this build has no ``heterocache.engine.registry`` (``err.name`` says so).
    """
    from .._method_names import METHODS, canonical_name, parse_method_spec

    if METHOD_MODULES and canonical_name(text.split(":")[0]) not in METHODS:
        return text.strip()  # a method of a --methods-from module: checked once that is imported
    try:
        name, params = parse_method_spec(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return ":".join([name, *(f"{k}={text_value(v)}" for k, v in params.items())])


def device_name(text: str) -> str:
    """An argparse ``type``: a torch device written ``TYPE`` or ``TYPE:INDEX`` (``cpu``, ``cuda``,
    ``cuda:1``, ``mps``, ...), checked for its form without importing torch."""
    kind, sep, index = text.strip().partition(":")
    if kind not in DEVICE_TYPES or (sep and not index.isdigit()):
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda, cuda:1 or mps, got {text!r} "
            f"(device types: {', '.join(sorted(DEVICE_TYPES))})"
        )
    return text.strip()


#: Device types ``torch.device`` accepts (with an optional index), and "npu" (Ascend's torch_npu
#: renames "privateuseone" to it).
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "xla", "meta", "hpu", "mtia", "ipu", "hip", "ve", "fpga",
                          "maia", "lazy", "vulkan", "mkldnn", "opengl", "opencl", "ideep", "privateuseone", "npu"})


def odd(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` that must also be odd (e.g. a pooling kernel width)."""

    def parse(text: str):
        value = kind(text)
        if value % 2 != 1:
            raise argparse.ArgumentTypeError(f"must be odd, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number"}.get(kind, kind.__name__)


def _range(low, high, low_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}]"

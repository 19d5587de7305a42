"""The built-in KV-cache methods by name, with their option names, without importing them.

The registry (:mod:`heterocache.engine.registry`) imports torch and transformers, which takes seconds; the
command line checks ``--methods`` against this table while parsing instead, so that a misspelt name
or option is refused at once. The table must list what the registry registers (names in its order,
whether each uses the budget, its option names); ``tests/cli/test_cli_early_errors.py`` compares them.

Standard library only.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import warnings
from typing import Any, NamedTuple


class MethodName(NamedTuple):
    """What the command line knows of a registered method before it is imported."""

    uses_budget: bool
    params: tuple[str, ...]
    #: the module that registers it when it is not registered by a module of :mod:`heterocache.methods`
    provider: str | None = None


#: The method registry's module (absent from a build without the engine).
REGISTRY = "heterocache.engine.registry"

_ENGINE = ("block_size", "reserve", "prefill")
_SNAPKV = ("budget_tokens", "window", "kernel", "pooling", "gqa_reduce")

#: Registry name -> what the command line checks, in registration order.
METHODS: dict[str, MethodName] = {
    "dynamic": MethodName(False, ()),
    "fullkv": MethodName(False, _ENGINE),
    "streamingllm": MethodName(True, ("budget_tokens", "sinks", "evict_during_decode", *_ENGINE)),
    "h2o": MethodName(True, ("budget_tokens", "recent_ratio", "evict_during_decode", "gqa_reduce", *_ENGINE)),
    "snapkv": MethodName(True, (*_SNAPKV, *_ENGINE)),
    "pyramidkv": MethodName(True, (*_SNAPKV, "beta", *_ENGINE)),
    "cake": MethodName(True, (*_SNAPKV, "tau1", "tau2", "gamma", "cascade", "evict_during_decode", *_ENGINE)),
    "quest": MethodName(True, ("budget_tokens", "page_size", "dense_layers", "min_pages", "gqa_reduce", *_ENGINE)),
    "omnikv": MethodName(True, ("budget_tokens", "filter_layers", "dense_after_filter", "scores", "offload",
                                *_ENGINE)),
    "shadowkv": MethodName(True, ("budget_tokens", "rank", "rank_dims", "chunk_size", "outlier_chunks",
                                  "local_chunks", *_ENGINE)),
    "heterocache": MethodName(
        True,
        ("profile", "budget_tokens", "window", "kernel", "refresh_interval", "drift_threshold", "refresh",
         "offload", "inverse_stability", "turn_reselect", "pivot_offload", *_ENGINE),
    ),
}

#: Other names accepted for a method. "full" is the evaluation harness's old name for the
#: uncompressed reference, transformers' own cache (which works with any attention implementation).
ALIASES: dict[str, str] = {"full": "dynamic"}
#: Aliases kept only so that old commands and scripts still run; using one warns.
DEPRECATED_ALIASES = frozenset({"full"})
#: Methods registered by a module of their own when that module is imported (lazily, on demand).
PROVIDERS: dict[str, str] = {name: m.provider for name, m in METHODS.items() if m.provider}


def module_exists(name: str) -> bool:
    """Whether module ``name`` is in this build, found without running the ``__init__`` of any
    package but the top one (``importlib.util.find_spec`` imports the parents, and
    ``heterocache.methods`` imports every method, hence torch)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    for i in range(len(rest)):
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(".".join([top, *rest[: i + 1]]),
                                                        spec.submodule_search_locations)
    return spec is not None


def canonical_name(method: str, *, stacklevel: int = 3) -> str:
    """``method`` in lower case with aliases resolved; a deprecated alias warns (FutureWarning)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a name (str), got {method!r}")
    key = method.strip().lower()
    if key in DEPRECATED_ALIASES:
        warnings.warn(f"method name {key!r} is deprecated; use {ALIASES[key]!r} (the same cache)",
                      FutureWarning, stacklevel=stacklevel)
    return ALIASES.get(key, key)


def spec_value(text: str) -> Any:
    """An option value as written in a method spec: ``true``/``false``, ``none``, a number, else text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``heterocache.engine.registry.parse_method_spec`` for the built-in methods, without importing them:
    the method's registry name and its options, or the registry's error.

    Raises:
        ValueError: unknown method (the message lists the known ones), a method whose module is not
            in this build, or an option written without ``=``.
        TypeError: an option the method does not have.
        ModuleNotFoundError: this build has no ``heterocache.engine.registry`` (``err.name`` says so).
    """
    if not module_exists(REGISTRY):
        raise ModuleNotFoundError(f"No module named {REGISTRY!r}", name=REGISTRY)
    if not isinstance(spec, str):
        raise TypeError(f"method must be a name (str), got {spec!r}")
    name, *items = spec.split(":")
    key = canonical_name(name, stacklevel=4)
    method = METHODS.get(key)
    if method is None:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    if method.provider is not None and not module_exists(method.provider):
        raise ValueError(f"method {name!r} is provided by {method.provider}, which is not available; "
                         f"available methods: {', '.join(k for k, m in METHODS.items() if m.provider is None)}")
    return key, parse_options(spec, items, key, method.params)


def parse_options(spec: str, items: list[str], method: str, known) -> dict[str, Any]:
    """The ``key=value`` items of a method spec (what follows its name) as a dict, values read by
    :func:`spec_value`; what the registry and this torch-free check both parse with.

    Raises:
        ValueError: an item written without ``=``.
        TypeError: an option not in ``known`` (the method's parameter names).
    """
    params: dict[str, Any] = {}
    for item in items:
        option, sep, value = item.partition("=")
        option = option.strip()
        if not sep or not option:
            raise ValueError(f"method option {item!r} of {spec!r} must be written key=value")
        if option not in known:
            raise TypeError(f"method {method!r} has no parameter {option!r}; its parameters: "
                            f"{', '.join(known) or 'none'}")
        params[option] = spec_value(value.strip())
    return params

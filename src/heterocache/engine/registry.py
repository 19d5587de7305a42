"""Every KV-cache method by name, on the same engine: the registry the evaluation harness uses.

::

    import heterocache
    from heterocache import list_methods, make_cache

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="heterocache")
    cache = make_cache("snapkv", 0.25, model)            # a fresh transformers Cache
    model.generate(**inputs, cache=cache)                # past_key_values= before transformers 5.24
    make_cache("h2o", None, model, budget_tokens=512)    # an absolute budget: 512 tokens per head

Each method is a module of :mod:`heterocache.methods` (its policy dataclass and a convenience
cache class, ``StreamingLLMCache(budget=0.25)``, ...) that registers itself here with
``register_method``; the registry imports :mod:`heterocache.methods` (all of them, in order) the
first time it is asked for a method, and registers transformers' own cache ("dynamic") itself.
``budget`` is the fraction of the prompt KV kept, in (0, 1] (kvpress's ``compression_ratio`` is
``1 - budget``); ``budget_tokens`` keeps an absolute number of prompt tokens per head instead.
Methods defined elsewhere register themselves with ``register_method``, or are imported when first
asked for (``PROVIDERS``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import Cache

from .._method_names import ALIASES, PROVIDERS, parse_options
from .._method_names import canonical_name as _canonical_name
from .architectures import check_architecture
from .cache import RaggedCache
from .integration import ATTENTION_NAME

__all__ = [
    "Method",
    "describe_methods",
    "get_method",
    "list_methods",
    "make_cache",
    "parse_method_spec",
    "register_method",
]

#: The package whose modules register the built-in methods (imported on first look-up).
BUILTINS = "heterocache.methods"


# -------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: registry name (lower case).
        description: one line.
        factory: ``factory(budget, model, **params) -> Cache`` (budget None when the method ignores
            it or ``budget_tokens`` is given).
        cache_class, policy_class: the classes behind it (None where there is none).
        params: parameter name -> default (the policy's fields other than ``budget``, plus the
            engine's ``block_size``, ``reserve`` and ``prefill`` for ragged caches).
        uses_budget: False for the uncompressed methods (they ignore the budget).
        needs_heterocache_attention: the cache is a ragged cache that only the ``heterocache``
            attention reads.
    """

    name: str
    description: str
    factory: Callable[..., Cache]
    cache_class: type | None = None
    policy_class: type | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    uses_budget: bool = True
    needs_heterocache_attention: bool = True


_REGISTRY: dict[str, Method] = {}

# ALIASES (other names accepted for a method), DEPRECATED_ALIASES (those that warn) and PROVIDERS
# (methods registered by a module of their own when that module is imported, lazily, on demand) are
# shared with the command line's torch-free check of method names (heterocache._method_names).

_ENGINE_PARAMS = {"block_size": 64, "reserve": 128, "prefill": "exact"}


def _policy_params(policy_class: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(policy_class):
        if f.name == "budget":
            continue
        out[f.name] = f.default if f.default is not dataclasses.MISSING else None
    return out


def register_method(
    name: str,
    *,
    description: str,
    cache_class: type | None = None,
    policy_class: type | None = None,
    factory: Callable[..., Cache] | None = None,
    params: Mapping[str, Any] | None = None,
    uses_budget: bool = True,
    needs_heterocache_attention: bool = True,
    replace: bool = False,
) -> Method:
    """Add a method to the registry (what the HeteroCache runtime calls to appear under its name).

    Args:
        name: registry name (case-insensitive).
        description: one line.
        cache_class: a cache class taking ``budget=`` (when ``uses_budget``) and ``params`` as keyword
            arguments; used when no ``factory`` is given.
        policy_class: the policy dataclass (its fields other than ``budget`` become the listed
            parameters when ``params`` is not given).
        factory: ``factory(budget, model, **params) -> Cache``; overrides ``cache_class``.
        params: parameter name -> default, for listings and to reject unknown parameters.
        uses_budget: False if the method ignores the budget.
        needs_heterocache_attention: whether the model must use the ``heterocache`` attention.
        replace: allow replacing an existing entry.

    Returns:
        the registered ``Method``.
    """
    _load_builtins()  # the built-in methods first: they keep their names and places in the listing
    key = name.lower()
    if key in _REGISTRY and not replace:
        raise ValueError(f"method {key!r} is registered already (pass replace=True to replace it)")
    if key in ALIASES:
        raise ValueError(f"{key!r} is an alias of {ALIASES[key]!r}")
    if factory is None:
        if cache_class is None:
            raise TypeError("register_method needs a factory or a cache_class")
        factory = _class_factory(cache_class, uses_budget)
    if params is None:
        params = _policy_params(policy_class) if policy_class is not None else {}
    if needs_heterocache_attention and cache_class is not None and issubclass(cache_class, RaggedCache):
        params = {**params, **_ENGINE_PARAMS}
    method = Method(
        name=key,
        description=description,
        factory=factory,
        cache_class=cache_class,
        policy_class=policy_class,
        params=MappingProxyType(dict(params)),
        uses_budget=uses_budget,
        needs_heterocache_attention=needs_heterocache_attention,
    )
    _REGISTRY[key] = method
    return method


def _class_factory(cache_class: type, uses_budget: bool) -> Callable[..., Cache]:
    def factory(budget, model, **params):
        if uses_budget and budget is not None:
            params["budget"] = budget
        return cache_class(**params)

    return factory


def _load_builtins() -> None:
    """Import the built-in methods (``BUILTINS``; each registers itself), once; a build without
    them is not an error. While they are being imported this returns at once (Python hands back the
    partly imported package), so their own ``register_method`` calls keep their order."""
    try:
        importlib.import_module(BUILTINS)
    except ModuleNotFoundError as err:
        if err.name is None or not (BUILTINS == err.name or BUILTINS.startswith(err.name + ".")):
            raise


def _load_provider(key: str) -> None:
    """Import the module that registers ``key`` (if any and not registered yet); a provider that
    does not exist yet is not an error, a broken one is."""
    module = PROVIDERS.get(key)
    if module is None or key in _REGISTRY:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise


def _canonical(method: str) -> str:
    return _canonical_name(method, stacklevel=4)


def get_method(method: str) -> Method:
    """The registry entry of a method (aliases accepted).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = _canonical(method)
    _load_builtins()
    _load_provider(key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in PROVIDERS:
        raise ValueError(
            f"method {method!r} is provided by {PROVIDERS[key]}, which is not available or did not register it "
            f"(it should call heterocache.register_method({key!r}, ...)); "
            f"available methods: {', '.join(_REGISTRY)}"
        )
    known = [*_REGISTRY, *(p for p in PROVIDERS if p not in _REGISTRY)]
    raise ValueError(f"unknown method {method!r}; known methods: {', '.join(known)}")


def list_methods() -> list[str]:
    """Names of the available methods, in registration order (providers loaded when available)."""
    _load_builtins()
    for key in PROVIDERS:
        _load_provider(key)
    return list(_REGISTRY)


def describe_methods() -> str:
    """A Markdown table of the methods: name, cache class, parameters with defaults, description."""
    lines = ["| method | cache class | parameters (defaults) | description |", "|---|---|---|---|"]
    for key in list_methods():
        m = _REGISTRY[key]
        params = ", ".join(f"`{k}={v!r}`" for k, v in m.params.items() if k not in _ENGINE_PARAMS) or "-"
        budget = "`budget`, " if m.uses_budget else ""
        cls = f"`{m.cache_class.__name__}`" if m.cache_class is not None else "-"
        lines.append(f"| `{key}` | {cls} | {budget}{params} | {m.description} |")
    return "\n".join(lines)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A method with options in one string, as the evaluation grid names it:
    ``"name"`` or ``"name:key=value:key=value"``, e.g.
    ``"heterocache:turn_reselect=own:summary_memory=host"`` (values: ``true``/``false``, ``none``,
    numbers, else text). The whole string is the method's name in records and reports.

    Returns:
        the registry name (aliases resolved) and the options.

    Raises:
        ValueError: unknown method, or an option written without ``=``.
        TypeError: an option the method does not have.
    """
    if not isinstance(spec, str):
        raise TypeError(f"method must be a name (str), got {spec!r}")
    name, *items = spec.split(":")
    method = get_method(name)
    return method.name, parse_options(spec, items, method.name, method.params)


def make_cache(method: str, budget: float | None = None, model=None, **params) -> Cache:
    """A new, empty cache for a method (what the evaluation harness calls for every sample).

    Args:
        method: a name from ``list_methods()`` (case-insensitive; "full", deprecated, = "dynamic"),
            optionally with options ``"name:key=value:..."`` (``parse_method_spec``; ``params``
            given here take precedence).
        budget: fraction of the prompt KV kept, in (0, 1]; ignored by "fullkv" and "dynamic"; may be
            None when ``budget_tokens`` is given.
        model: the model the cache is for (optional): ragged methods check that it uses the
            ``heterocache`` attention; "dynamic" sizes its layers from its config.
        **params: the method's parameters (``describe_methods()``), e.g. ``window=16`` or
            ``budget_tokens=512``; for ragged caches also the engine's ``block_size``, ``reserve``
            and ``prefill`` ("exact" or "bounded", ``docs/prefill.md``).

    Returns:
        a ``transformers.Cache``.

    Raises:
        ValueError: unknown method, invalid budget, or a model whose attention cannot read the cache.
        UnsupportedArchitectureError: (a ValueError) a ragged method for a model whose architecture
            the engine cannot serve exactly (``heterocache.engine.architectures``).
        TypeError: a parameter the method does not have.
    """
    name, options = parse_method_spec(method)
    params = {**options, **params}
    spec = get_method(name)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        known = ", ".join(spec.params) or "none"
        raise TypeError(f"method {spec.name!r} has no parameter(s) {', '.join(unknown)}; its parameters: {known}")
    if spec.uses_budget and budget is None and params.get("budget_tokens") is None:
        raise ValueError(f"method {spec.name!r} needs a budget (fraction in (0, 1]) or budget_tokens")
    if model is not None and spec.needs_heterocache_attention:
        check_architecture(model.config)
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attn is not None and attn != ATTENTION_NAME:
            raise ValueError(
                f"method {spec.name!r} keeps a ragged per-head cache that only the {ATTENTION_NAME!r} attention "
                f"reads, but the model uses {attn!r}: load it with attn_implementation={ATTENTION_NAME!r} or call "
                "heterocache.enable(model) (or use method 'dynamic' for transformers' own cache)"
            )
    prefill = params.pop("prefill", None)  # the engine's (RaggedCache.prefill), whatever the factory takes
    cache = spec.factory(budget if spec.uses_budget else None, model, **params)
    if prefill is not None:
        cache.prefill = prefill
    return cache


def _dynamic_factory(budget, model, **params) -> Cache:
    config = getattr(model, "config", None)
    return DynamicCache(config=config) if config is not None else DynamicCache()


# transformers' own cache, registered here (first), not by a module of heterocache.methods
_REGISTRY["dynamic"] = Method(
    name="dynamic",
    description="transformers' DynamicCache read by the model's own attention (no compression, outside the engine)",
    factory=_dynamic_factory,
    cache_class=DynamicCache,
    params=MappingProxyType({}),
    uses_budget=False,
    needs_heterocache_attention=False,
)

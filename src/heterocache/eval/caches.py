"""Where the runner gets a fresh KV cache for each generation: the method-registry interface.

A *cache factory* is any callable ``make_cache(method: str, budget: float, model) -> Cache | None``:
``method`` is a registry name ("dynamic", "snapkv", "heterocache", ...), ``budget`` the fraction of
the prompt's KV kept in fast memory (0 < budget <= 1; kvpress's compression_ratio is 1 - budget),
``model`` the loaded model. It must return a new, empty cache on every call; ``None`` means
"transformers' default DynamicCache". The runner never shares a cache between two samples.

By default the factory is ``heterocache.engine.registry.make_cache`` when that module exists; without it
only the uncompressed methods in :data:`FULL_METHODS` are available.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections import Counter
from collections.abc import Callable

#: Method names that keep the whole cache: run once per cell at budget 1.0, drawn as a reference line.
#: "dynamic" (transformers' DynamicCache) is the reference; "full" is its old name.
FULL_METHODS = frozenset({"full", "dynamic", "fullkv"})

#: Old method names -> current ones. The harness called the reference "full" before it took the
#: registry's (and ``heterocache bench``'s) name "dynamic"; records written then still say "full".
RENAMED_METHODS = {"full": "dynamic"}

CacheFactory = Callable[[str, float, object], object]


def is_full(method: str) -> bool:
    """Whether ``method`` keeps the whole KV cache (its budget is irrelevant)."""
    return method.lower() in FULL_METHODS


def current_name(method: str, *, warn: bool = False) -> str:
    """``method`` under its current name (``"full"`` -> ``"dynamic"``); other names unchanged.

    Args:
        warn: emit a ``FutureWarning`` for an old name (for names a user typed; stored records
            are renamed silently).
    """
    new = RENAMED_METHODS.get(method.strip().lower()) if isinstance(method, str) else None
    if new is None:
        return method
    if warn:
        warnings.warn(f"method name {method!r} is deprecated; use {new!r} (the same cache)", FutureWarning,
                      stacklevel=3)
    return new


def dynamic_only_factory(method: str, budget: float, model) -> object:
    """Fallback factory: a ``transformers.DynamicCache`` for the full-cache methods, else an error."""
    from transformers import DynamicCache

    if is_full(method):
        return DynamicCache()
    raise ValueError(
        f"unknown method {method!r}: the method registry (heterocache.engine.registry) is not available, so only "
        f"{', '.join(sorted(FULL_METHODS))} can be evaluated"
    )


def default_cache_factory() -> CacheFactory:
    """``heterocache.engine.registry.make_cache`` if the module exists, else :func:`dynamic_only_factory`."""
    try:
        module = importlib.import_module("heterocache.engine.registry")
    except ModuleNotFoundError as err:
        if err.name not in ("heterocache.engine.registry", "heterocache.engine", "heterocache"):
            raise  # the registry exists but one of its own imports is broken: say so
        return dynamic_only_factory
    return module.make_cache


def with_prefill_mode(factory: CacheFactory, mode: str) -> CacheFactory:
    """``factory`` whose ragged caches compress a prompt in pieces as ``mode`` says
    (``RaggedCache.prefill``; a method that cannot raises ValueError, which skips it)."""
    from heterocache.engine.cache import RaggedCache

    def make(method, budget, model):
        cache = factory(method, budget, model)
        if isinstance(cache, RaggedCache):
            cache.prefill = mode
        return cache

    return make


def new_cache(factory: CacheFactory, method: str, budget: float, model):
    """A fresh cache from ``factory``; ``None`` from the factory becomes a ``DynamicCache`` so that
    the query-agnostic mode always has a cache object to carry from prefill to generation."""
    cache = factory(method, budget, model)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    return cache


def cache_settings(cache) -> dict:
    """What decides a cache's behaviour, as plain JSON values: its class and, for a ragged cache, its
    policy's class and options (a profile by its model name and role counts). Recorded with each
    generation so that a resumed run notices records made under other settings (e.g. a changed
    default) instead of mixing them in."""
    from ..engine.cache import RaggedCache  # here: this module is read by the torch-free CLI

    settings = {"cache": type(cache).__name__}
    policy = cache.policy if isinstance(cache, RaggedCache) else None
    if policy is None or not dataclasses.is_dataclass(policy):
        return settings
    options = {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if f.name == "profile" and value is not None:
            from heterocache.profile import Role

            roles = Counter(Role(int(r)).label for r in value.roles.flatten())
            value = {"model": getattr(value, "model_name", None), "roles": dict(sorted(roles.items()))}
        elif not isinstance(value, (bool, int, float, str, type(None))):
            continue  # runtime state, not an option
        options[f.name] = value
    settings["policy"] = type(policy).__name__
    settings["options"] = options
    return settings


def option_defaults(cache) -> dict:
    """The defaults of a ragged cache's policy options (``cache_settings``' "options"), for
    ``settings_agree``; empty for other caches."""
    from ..engine.cache import RaggedCache  # here: this module is read by the torch-free CLI

    policy = cache.policy if isinstance(cache, RaggedCache) else None
    if policy is None or not dataclasses.is_dataclass(policy):
        return {}
    out = {f.name: f.default for f in dataclasses.fields(policy) if f.default is not dataclasses.MISSING}
    # The values a policy resolves its defaults to (e.g. None -> "off") are what a record shows.
    fields = {f.name for f in dataclasses.fields(policy)}
    given = {k: getattr(policy, k) for k in ("profile", "budget", "budget_tokens") if k in fields}
    try:
        plain = type(policy)(**given)
    except (TypeError, ValueError):
        return out
    out.update({f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)
                if isinstance(getattr(plain, f.name), (bool, int, float, str, type(None)))})
    return out


def _anchor_offload_default(options: dict) -> bool:
    """HeteroCache's retired ``anchor_offload`` as its default resolved: on exactly when a new turn
    re-chose the anchors (``turn_reselect="own"``, which needs ``offload``); now always so."""
    return options.get("offload", True) and options.get("turn_reselect", "own") == "own"


#: Options a policy no longer has (by policy class), with the value that gave the behaviour kept
#: (a callable: computed from the record's other options). A record made when the option existed
#: describes the current cache only if it used that value (docs/results.md#ablations).
RETIRED_OPTIONS: dict[str, dict[str, object]] = {
    "HeteroCachePolicy": {
        "score_window": None,
        "pooling": "avg",
        "turn_refresh": "always",
        "drift_topk": None,
        "turn_scoring": "keys",
        "page_size": 16,
        "summaries_in_budget": True,
        "summary_memory": "device",
        "summary_drift": False,
        "asynchronous": True,
        "decision_lag": 2,
        "turn_window": 32,
        "anchor_offload": _anchor_offload_default,
    },
}


def settings_agree(recorded: dict, current: dict, defaults: dict) -> bool:
    """Whether a record's ``cache_settings`` describe the current cache. An option the record
    lacks counts as its default (``defaults``): an option added to a policy later, at the value
    that keeps the old behaviour, does not make the records before it stale. An option the policy
    no longer has (:data:`RETIRED_OPTIONS`) agrees only at the value whose behaviour was kept."""
    if {k: v for k, v in recorded.items() if k != "options"} != {k: v for k, v in current.items() if k != "options"}:
        return False
    old, new = dict(recorded.get("options", {})), current.get("options", {})
    for name, kept in RETIRED_OPTIONS.get(recorded.get("policy"), {}).items():
        if name in old and name not in new:
            value = old.pop(name)
            if value != (kept(old) if callable(kept) else kept):
                return False
    missing = object()
    return all(old.get(k, defaults.get(k, missing)) == new.get(k, defaults.get(k, missing)) for k in {*old, *new})

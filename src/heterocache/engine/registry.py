"""Every KV-cache method by name, on the same engine: the one list that ``make_cache``,
``list_methods``, the command line, the evaluation harness, the README's method table and the tests
read.

::

    import heterocache
    from heterocache import list_methods, make_cache

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="heterocache")
    cache = make_cache("snapkv", 0.25, model)            # a fresh transformers Cache
    model.generate(**inputs, cache=cache)                # past_key_values= before transformers 5.24
    make_cache("h2o", None, model, budget_tokens=512)    # an absolute budget: 512 tokens per head

A method is one module of :mod:`heterocache.methods` (or a user's own file): a policy dataclass
registered with the :func:`register_method` decorator, which also makes its cache class
(``SnapKVPolicy`` -> ``SnapKVCache(budget=0.25, **options)``)::

    @register_method("keynorm", description="keep the keys of lowest L2 norm", paper="https://arxiv.org/abs/2406.11430")
    @dataclass
    class KeyNormPolicy(ScorerPolicy):
        def score(self, ctx):
            return -ctx.key.float().norm(dim=-1)

The registry imports :mod:`heterocache.methods` (all of them, in order) the first time it is asked
for a method, and registers transformers' own cache ("dynamic") itself. ``budget`` is the fraction
of the prompt KV kept, in (0, 1] (kvpress's ``compression_ratio`` is ``1 - budget``);
``budget_tokens`` keeps an absolute number of prompt tokens per head instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import Cache

from .._method_names import ALIASES, parse_options
from .._method_names import canonical_name as _canonical_name
from ..policy.base import Policy
from .architectures import check_architecture
from .cache import PolicyCache, RaggedCache
from .integration import ATTENTION_NAME

__all__ = [
    "Method",
    "describe_methods",
    "get_method",
    "list_methods",
    "make_cache",
    "parse_method_spec",
    "policy_cache_class",
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
        paper: a link to the method's paper (None for the engine's own references).
    """

    name: str
    description: str
    factory: Callable[..., Cache]
    cache_class: type | None = None
    policy_class: type | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    uses_budget: bool = True
    needs_heterocache_attention: bool = True
    paper: str | None = None

    @property
    def builtin(self) -> bool:
        """Whether the method is one of the package's own (not a user's registered one)."""
        defined_by = self.policy_class if self.policy_class is not None else self.factory
        return getattr(defined_by, "__module__", "").startswith("heterocache.")

    @property
    def selects_per_step(self) -> bool:
        """Whether the method chooses, at every decode step, what attention reads (dynamic retrieval)."""
        return self.policy_class is not None and self.policy_class.selects_per_step


_REGISTRY: dict[str, Method] = {}

# ALIASES (other names accepted for a method) and DEPRECATED_ALIASES (those that warn) are shared
# with the command line's torch-free check of method names (heterocache._method_names).

#: The engine's own parameters, which every ragged cache takes besides its policy's.
ENGINE_PARAMS = {"block_size": 64, "reserve": 128, "prefill": "exact"}


def _policy_params(policy_class: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(policy_class):
        if f.name == "budget":
            continue
        out[f.name] = f.default if f.default is not dataclasses.MISSING else None
    return out


def _budget_default(policy_class: type) -> float | None:
    for f in dataclasses.fields(policy_class):
        if f.name == "budget":
            return f.default if f.default is not dataclasses.MISSING else None
    return None


def policy_cache_class(policy_class: type, *, uses_budget: bool = True, name: str | None = None) -> type:
    """The cache class of a policy: a ``PolicyCache`` subclass named after it (``SnapKVPolicy`` ->
    ``SnapKVCache``) whose ``__init__(budget=<the policy's default>, block_size=64, reserve=128,
    prefill="exact", **options)`` builds the policy from its options (``budget`` left out when not ``uses_budget``).
    What :func:`register_method` makes for every policy it registers."""
    name = name or policy_class.__name__.removesuffix("Policy") + "Cache"
    budget_default = _budget_default(policy_class)

    if uses_budget:
        def __init__(self, budget=budget_default, block_size: int = 64, reserve: int = 128, prefill: str = "exact",
                     **options):
            RaggedCache.__init__(self, policy_class(budget=budget, **options), block_size, reserve, prefill)
        budget_doc = (f"        budget: fraction of the prompt KV kept, in (0, 1] (default {budget_default}).\n")
    else:
        def __init__(self, block_size: int = 64, reserve: int = 128, prefill: str = "exact", **options):
            RaggedCache.__init__(self, policy_class(**options), block_size, reserve, prefill)
        budget_doc = ""
    summary = (policy_class.__doc__ or policy_class.__name__).strip().splitlines()[0]
    doc = (f"{summary}\n\nThe cache of :class:`{policy_class.__module__}.{policy_class.__name__}`.\n\n"
           f"    Args:\n{budget_doc}"
           "        block_size, reserve: store layout (see ``RaggedCache``).\n"
           "        prefill: \"exact\" or \"bounded\", how a prompt in pieces is compressed (see ``RaggedCache``).\n"
           f"        **options: the policy's options (see ``{policy_class.__name__}``).\n")
    __init__.__qualname__ = f"{name}.__init__"
    return type(name, (PolicyCache,), {
        "__init__": __init__, "__doc__": doc, "__module__": policy_class.__module__, "__qualname__": name,
        "policy_class": policy_class,
    })


def register_method(
    name: str,
    *,
    description: str,
    paper: str | None = None,
    uses_budget: bool = True,
    needs_heterocache_attention: bool = True,
    policy_class: type | None = None,
    cache_class: type | None = None,
    params: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Callable:
    """Class decorator that adds a method to the registry under ``name``.

    Decorate a ``Policy`` dataclass (the usual case): its cache class is made from it
    (:func:`policy_cache_class`, also set as ``policy.cache_class``), its fields other than
    ``budget`` become the method's parameters, and ``make_cache(name, budget, model, **options)``,
    the command line (``--methods NAME``) and the evaluation harness find it. Or decorate a factory
    ``factory(budget, model, **params) -> Cache`` for a cache that needs more than its options
    (HeteroCache finds its profile from the model), giving ``policy_class``/``cache_class`` for
    the listing.

    Args:
        name: registry name (case-insensitive).
        description: one line.
        paper: a link to the method's paper.
        uses_budget: False if the method ignores the budget (its cache then takes no ``budget``).
        needs_heterocache_attention: whether the model must use the ``heterocache`` attention.
        policy_class, cache_class: with a factory: the classes behind it.
        params: parameter name -> default (default: the policy's fields, plus ``block_size``,
            ``reserve`` and ``prefill`` for ragged caches).
        replace: allow replacing an existing entry (the same definition run again, from the same
            module and qualified name, always replaces it).

    Returns:
        the decorator, which returns what it decorates unchanged (a policy gains ``cache_class``).

    Raises:
        ValueError: ``name`` is registered already (without ``replace``) or is an alias.
        TypeError: what is decorated is neither a ``Policy`` subclass nor callable.
    """
    key = name.lower()

    def decorate(obj):
        _load_builtins()  # the built-in methods first: they keep their names and places in the listing
        if key in _REGISTRY and not (replace or _same_definition(_REGISTRY[key], obj)):
            raise ValueError(f"method {key!r} is registered already (pass replace=True to replace it)")
        if key in ALIASES:
            raise ValueError(f"{key!r} is an alias of {ALIASES[key]!r}")
        policy, cache = policy_class, cache_class
        if isinstance(obj, type) and issubclass(obj, Policy):
            policy = obj
            cache = cache or policy_cache_class(policy, uses_budget=uses_budget)
            policy.name, policy.cache_class = key, cache
            factory = _class_factory(cache, uses_budget)
        elif callable(obj) and not isinstance(obj, type):
            factory = obj
        else:
            raise TypeError(f"register_method decorates a Policy subclass or a cache factory, got {obj!r}")
        listed = params
        if listed is None:
            listed = _policy_params(policy) if policy is not None else {}
            if needs_heterocache_attention and (policy is not None or
                                                (cache is not None and issubclass(cache, RaggedCache))):
                listed = {**listed, **ENGINE_PARAMS}
        _REGISTRY[key] = Method(
            name=key,
            description=description,
            factory=factory,
            cache_class=cache,
            policy_class=policy,
            params=MappingProxyType(dict(listed)),
            uses_budget=uses_budget,
            needs_heterocache_attention=needs_heterocache_attention,
            paper=paper,
        )
        return obj

    return decorate


def _same_definition(method: Method, obj) -> bool:
    """Whether ``obj`` is the registered definition run again (a file imported twice, under any
    module name; a notebook cell run twice): same qualified name, defined in the same file (or the
    same module). Then it replaces the entry quietly."""
    old = method.policy_class if isinstance(obj, type) else method.factory
    if old is None or getattr(old, "__qualname__", None) != getattr(obj, "__qualname__", None):
        return False
    return _defined_in(old) == _defined_in(obj)


def _defined_in(obj) -> str | None:
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    return getattr(module, "__file__", None) or getattr(obj, "__module__", None)


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


def _canonical(method: str) -> str:
    return _canonical_name(method, stacklevel=4)


def get_method(method: str) -> Method:
    """The registry entry of a method (aliases accepted).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = _canonical(method)
    _load_builtins()
    if key in _REGISTRY:
        return _REGISTRY[key]
    raise ValueError(f"unknown method {method!r}; known methods: {', '.join(_REGISTRY)}")


def list_methods() -> list[str]:
    """Names of the available methods, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def describe_methods(builtin_only: bool = False) -> str:
    """A Markdown table of the methods: name, cache class, parameters with defaults, description
    with the paper's link (the README's method table is this with ``builtin_only``, checked by a
    test)."""
    lines = ["| method | cache class | parameters (defaults) | description |", "|---|---|---|---|"]
    for key in list_methods():
        if builtin_only and not _REGISTRY[key].builtin:
            continue
        m = _REGISTRY[key]
        params = ", ".join(f"`{k}={v!r}`" for k, v in m.params.items() if k not in ENGINE_PARAMS) or "-"
        budget = "`budget`, " if m.uses_budget else ""
        cls = f"`{m.cache_class.__name__}`" if m.cache_class is not None else "-"
        about = f"{m.description} ([paper]({m.paper}))" if m.paper else m.description
        lines.append(f"| `{key}` | {cls} | {budget}{params} | {about} |")
    return "\n".join(lines)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A method with options in one string, as the evaluation grid names it:
    ``"name"`` or ``"name:key=value:key=value"``, e.g.
    ``"heterocache:turn_reselect=pivot:refresh_interval=2"`` (values: ``true``/``false``, ``none``,
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

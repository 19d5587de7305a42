"""heterocache: heterogeneous KV-cache compression for Hugging Face transformers.

Importing the package registers the ``"heterocache"`` attention implementation with transformers.
The public names are loaded on first use (module ``__getattr__``), so that the command line, which
skips the registration (:mod:`heterocache._launch`), starts without torch and transformers.
"""

from __future__ import annotations

from ._lazy import lazy_exports

from ._launch import started_as_cli as _started_as_cli
from ._version import __version__

# public name -> submodule defining it
_EXPORTS = {
    "UnsupportedArchitectureError": "engine.architectures",
    "check_architecture": "engine.architectures",
    "ATTENTION_NAME": "engine.integration",
    "AttentionNotEnabledError": "engine.integration",
    "enable": "engine.integration",
    "check_budget": "budget",
    "FullKVCache": "engine.cache",
    "RaggedCache": "engine.cache",
    "SnapKVCache": "engine.cache",
    "MemoryReport": "engine.memory",
    "KVShard": "engine.parallel",
    "TensorParallelError": "engine.parallel",
    "CAKEPolicy": "policies",
    "FullKVPolicy": "policies",
    "H2OPolicy": "policies",
    "OmniKVPolicy": "policies",
    "Policy": "policies",
    "PrefillContext": "policies",
    "PyramidKVPolicy": "policies",
    "QuestPolicy": "policies",
    "ShadowKVPolicy": "policies",
    "SnapKVPolicy": "policies",
    "StreamingLLMPolicy": "policies",
    "CAKECache": "methods",
    "H2OCache": "methods",
    "OmniKVCache": "methods",
    "PyramidKVCache": "methods",
    "QuestCache": "methods",
    "ShadowKVCache": "methods",
    "StreamingLLMCache": "methods",
    "list_methods": "methods",
    "make_cache": "methods",
    "register_method": "methods",
    "HeteroCache": "hetero",
    "HeteroCachePolicy": "hetero",
    "InfeasibleBudgetError": "hetero",
    "HeadProfile": "profile",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)


if not _started_as_cli():
    from .engine import integration as _integration  # noqa: F401, E402  (registers the attention with transformers)

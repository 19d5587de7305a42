"""heterocache: heterogeneous KV-cache compression for Hugging Face transformers.

Importing the package registers the ``"heterocache"`` attention implementation with transformers.
The public names are loaded on first use (module ``__getattr__``), so that the command line, which
skips the registration (:mod:`heterocache._launch`), starts without torch and transformers.
"""

from __future__ import annotations

from ._launch import started_as_cli as _started_as_cli
from ._lazy import lazy_exports
from ._version import __version__  # noqa: F401  (public: heterocache.__version__)

# public name -> submodule defining it
_EXPORTS = {
    "UnsupportedArchitectureError": "engine.architectures",
    "check_architecture": "engine.architectures",
    "ATTENTION_NAME": "engine.integration",
    "AttentionNotEnabledError": "engine.integration",
    "enable": "engine.integration",
    "RaggedCache": "engine.cache",
    "MemoryReport": "engine.memory",
    "KVShard": "engine.parallel",
    "TensorParallelError": "engine.parallel",
    "list_methods": "engine.registry",
    "make_cache": "engine.registry",
    "register_method": "engine.registry",
    "check_budget": "policy.budget",
    "FullKVPolicy": "policy.base",
    "Policy": "policy.base",
    "PrefillContext": "policy.base",
    "FullKVCache": "methods.fullkv",
    "StreamingLLMCache": "methods.streamingllm",
    "StreamingLLMPolicy": "methods.streamingllm",
    "H2OCache": "methods.h2o",
    "H2OPolicy": "methods.h2o",
    "SnapKVCache": "methods.snapkv",
    "SnapKVPolicy": "methods.snapkv",
    "PyramidKVCache": "methods.pyramidkv",
    "PyramidKVPolicy": "methods.pyramidkv",
    "CAKECache": "methods.cake",
    "CAKEPolicy": "methods.cake",
    "QuestCache": "methods.quest",
    "QuestPolicy": "methods.quest",
    "OmniKVCache": "methods.omnikv",
    "OmniKVPolicy": "methods.omnikv",
    "ShadowKVCache": "methods.shadowkv",
    "ShadowKVPolicy": "methods.shadowkv",
    "HeteroCache": "methods.heterocache",
    "HeteroCachePolicy": "methods.heterocache",
    "InfeasibleBudgetError": "methods.heterocache",
    "HeadProfile": "profile",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)


if not _started_as_cli():
    from .engine import integration as _integration  # noqa: F401, E402  (registers the attention with transformers)

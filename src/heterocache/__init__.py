"""heterocache: heterogeneous KV-cache compression for Hugging Face transformers.

Importing the package registers the ``"heterocache"`` attention implementation with transformers.
The public names are loaded on first use (module ``__getattr__``), so that the command line, which
skips the registration (:mod:`heterocache._launch`), starts without torch and transformers.
"""

from __future__ import annotations

from ._launch import started_as_cli as _started_as_cli
from ._lazy import lazy_exports
from ._version import __version__  # noqa: F401  (public: heterocache.__version__)

# public name -> submodule defining it: what a user writes. A method's policy, the Policy interface
# and the engine's internals stay in their modules (heterocache.policy, heterocache.methods.<name>,
# heterocache.engine).
_EXPORTS = {
    # the caches, one per registered method (made by the registry from each method's policy)
    "FullKVCache": "methods.fullkv",
    "StreamingLLMCache": "methods.streamingllm",
    "H2OCache": "methods.h2o",
    "SnapKVCache": "methods.snapkv",
    "PyramidKVCache": "methods.pyramidkv",
    "CAKECache": "methods.cake",
    "QuestCache": "methods.quest",
    "OmniKVCache": "methods.omnikv",
    "ShadowKVCache": "methods.shadowkv",
    "HeteroCache": "methods.heterocache",
    "RaggedCache": "engine.cache",
    # methods by name, and a user's own
    "list_methods": "engine.registry",
    "make_cache": "engine.registry",
    "register_method": "engine.registry",
    # the model side
    "enable": "engine.integration",
    "check_architecture": "engine.architectures",
    # profiles
    "HeadProfile": "profile",
    "profile_for_model": "profile",
    # errors
    "AttentionNotEnabledError": "engine.integration",
    "InfeasibleBudgetError": "methods.heterocache",
    "ProfileError": "profile",
    "TensorParallelError": "engine.parallel",
    "UnsupportedArchitectureError": "engine.architectures",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)


if not _started_as_cli():
    from .engine import integration as _integration  # noqa: F401, E402  (registers the attention with transformers)

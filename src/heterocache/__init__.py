"""heterocache: heterogeneous KV-cache compression for Hugging Face transformers.

Importing the package registers the ``"heterocache"`` attention implementation with transformers.
"""

__version__ = "0.1.0"

from .architectures import UnsupportedArchitectureError, check_architecture  # noqa: E402
from .attention import ATTENTION_NAME, AttentionNotEnabledError, enable  # noqa: E402  (registers)
from .budget import check_budget  # noqa: E402
from .cache import FullKVCache, RaggedCache, SnapKVCache  # noqa: E402
from .memory import MemoryReport  # noqa: E402
from .policies import FullKVPolicy, Policy, PrefillContext, SnapKVPolicy  # noqa: E402
from .policies import CAKEPolicy, H2OPolicy, PyramidKVPolicy, StreamingLLMPolicy  # noqa: E402
from .methods import CAKECache, H2OCache, PyramidKVCache, StreamingLLMCache  # noqa: E402
from .methods import list_methods, make_cache, register_method  # noqa: E402
from .hetero import HeteroCache, HeteroCachePolicy, InfeasibleBudgetError  # noqa: E402
from .profile import HeadProfile  # noqa: E402

__all__ = [
    "ATTENTION_NAME",
    "AttentionNotEnabledError",
    "FullKVCache",
    "FullKVPolicy",
    "MemoryReport",
    "Policy",
    "PrefillContext",
    "RaggedCache",
    "SnapKVCache",
    "SnapKVPolicy",
    "UnsupportedArchitectureError",
    "check_architecture",
    "check_budget",
    "enable",
]
__all__ += [
    "CAKECache",
    "CAKEPolicy",
    "H2OCache",
    "H2OPolicy",
    "PyramidKVCache",
    "PyramidKVPolicy",
    "StreamingLLMCache",
    "StreamingLLMPolicy",
    "list_methods",
    "make_cache",
    "register_method",
]
__all__ += ["HeadProfile", "HeteroCache", "HeteroCachePolicy", "InfeasibleBudgetError"]

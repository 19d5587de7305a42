"""KV policies: which tokens each (layer, KV head) keeps and what happens while decoding."""

from .base import Policy, PrefillContext
from .budgeted import BudgetedPolicy
from .cake import CAKEPolicy
from .full import FullKVPolicy
from .h2o import H2OPolicy
from .pyramidkv import PyramidKVPolicy
from .omnikv import OmniKVPolicy
from .quest import QuestPolicy
from .shadowkv import ShadowKVPolicy
from .snapkv import SnapKVPolicy
from .streamingllm import StreamingLLMPolicy

__all__ = ["Policy", "PrefillContext", "FullKVPolicy", "SnapKVPolicy"]
__all__ += ["BudgetedPolicy", "StreamingLLMPolicy", "H2OPolicy", "PyramidKVPolicy", "CAKEPolicy", "QuestPolicy",
            "OmniKVPolicy", "ShadowKVPolicy"]

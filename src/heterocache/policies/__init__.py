"""KV policies: which tokens each (layer, KV head) keeps and what happens while decoding."""

from .base import Policy, PrefillContext
from .full import FullKVPolicy
from .snapkv import SnapKVPolicy

__all__ = ["Policy", "PrefillContext", "FullKVPolicy", "SnapKVPolicy"]

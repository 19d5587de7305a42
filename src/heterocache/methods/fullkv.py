"""FullKV: keep every token (the uncompressed reference on the ragged engine)."""

from __future__ import annotations

from ..engine.cache import RaggedCache
from ..engine.registry import register_method
from ..policy.base import FullKVPolicy


class FullKVCache(RaggedCache):
    """Keeps every token on the ragged engine: the uncompressed reference.

    Gives exactly the tokens of DynamicCache + sdpa.
    """

    def __init__(self, block_size: int = 64, reserve: int = 128):
        super().__init__(FullKVPolicy(), block_size, reserve)


register_method(
    "fullkv",
    description="every token on the ragged engine (no compression; exactly DynamicCache's tokens)",
    cache_class=FullKVCache,
    policy_class=FullKVPolicy,
    uses_budget=False,
)

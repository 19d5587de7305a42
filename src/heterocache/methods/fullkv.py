"""FullKV: keep every token (the uncompressed reference on the ragged engine).

The policy is the engine's default, ``heterocache.policy.base.FullKVPolicy`` (what a ``RaggedCache``
uses when given none); this module registers it by name. Gives exactly the tokens of
DynamicCache + sdpa.
"""

from __future__ import annotations

from ..engine.registry import register_method
from ..policy.base import FullKVPolicy

register_method(
    "fullkv",
    description="every token on the ragged engine (no compression; exactly DynamicCache's tokens)",
    uses_budget=False,
)(FullKVPolicy)

FullKVCache = FullKVPolicy.cache_class

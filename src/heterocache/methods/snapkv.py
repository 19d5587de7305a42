"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.registry import register_method
from ..policy.window_selection import WindowScoredPolicy


@register_method(
    "snapkv",
    description="prompt tokens most attended by the last prompt queries, pooled (Li et al. 2024)",
    paper="https://arxiv.org/abs/2404.14469",
)
@dataclass
class SnapKVPolicy(WindowScoredPolicy):
    """Keep the prompt tokens most attended by the last ``window`` prompt queries.

    Every KV head of every layer keeps ``round(budget * prompt_tokens)`` tokens, or
    ``min(budget_tokens, prompt_tokens)`` (uniform budget):
    the observation window itself plus the top-scoring earlier tokens, scores summed over the window
    queries, pooled along the sequence and reduced over the GQA group (scored and stored per KV head,
    never per query head). The selection is ``heterocache.policy.window_selection``'s, which
    PyramidKV shares.

    Args:
        budget: fraction of the prompt KV kept, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; prompt tokens kept per head, overrides ``budget`` (default None).
        window: observation window (last prompt queries). Default 32 (paper).
        kernel: pooling kernel. Default 5 (paper's 7 for some models; 5 in the reference code).
        pooling: "avg" or "max". Default "avg".
        gqa_reduce: how a GQA group's query-head scores become one KV-head score: "mean" or "max".

    Decoded tokens are appended and never evicted.
    """


SnapKVCache = SnapKVPolicy.cache_class

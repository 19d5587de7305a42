"""SnapKV's window-scored selection, shared by the methods that score prompt tokens the same way.

The importance of a prompt token is the attention it receives from the last ``window`` prompt
queries, pooled along the sequence and reduced over the GQA group (scored and stored per KV head,
never per query head). SnapKV keeps the same number of top tokens in every layer; PyramidKV keeps
them with per-layer budgets; CAKE validates its scoring fields with ``check_window_scoring``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillContext
from .scorer import ScorerPolicy
from .scoring import pool_scores, reduce_gqa, window_attention_scores


@dataclass
class WindowScoredPolicy(ScorerPolicy):
    """Keep the prompt tokens most attended by the last ``window`` prompt queries.

    Every KV head of every layer keeps ``round(budget * prompt_tokens)`` tokens, or
    ``min(budget_tokens, prompt_tokens)`` (uniform budget; subclasses override ``plan`` for
    per-layer budgets): the observation window itself plus the top-scoring earlier tokens, scores
    summed over the window queries, pooled along the sequence and reduced over the GQA group.

    Args:
        budget: fraction of the prompt KV kept, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; prompt tokens kept per head, overrides ``budget`` (default None).
        window: observation window (last prompt queries). Default 32 (SnapKV paper).
        kernel: pooling kernel. Default 5 (the paper's 7 for some models; 5 in the reference code).
        pooling: "avg" or "max". Default "avg".
        gqa_reduce: how a GQA group's query-head scores become one KV-head score: "mean" or "max".

    Decoded tokens are appended and never evicted.
    """

    budget: float | None = 0.25
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa_reduce: str = "mean"

    bounded_prefill = True

    def __post_init__(self):
        super().__post_init__()
        check_window_scoring(self)

    @property
    def prompt_queries(self) -> int:
        """The observation window: the last prompt queries the selection reads."""
        return self.window

    def protected_tokens(self) -> int:
        return self.window  # the observation window is always kept

    def score(self, ctx: PrefillContext) -> torch.Tensor:
        return self.token_scores(ctx)

    def token_scores(self, ctx: PrefillContext) -> torch.Tensor:
        """SnapKV's importance of every prompt token per KV head: float32 ``[B, H, L]``."""
        scores = window_attention_scores(ctx.query, ctx.key, ctx.key_valid, self.window, ctx.scaling)
        return reduce_gqa(pool_scores(scores, self.kernel, self.pooling), ctx.key.shape[1], self.gqa_reduce)


def check_window_scoring(policy) -> None:
    """Validate the window-scoring fields that SnapKV, PyramidKV and CAKE share.

    Raises:
        ValueError: window < 1, an even or non-positive kernel, unknown pooling or GQA reduction.
    """
    if policy.window < 1:
        raise ValueError(f"window must be >= 1, got {policy.window}")
    if policy.kernel < 1 or policy.kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number, got {policy.kernel}")
    if policy.pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {policy.pooling!r}")
    if policy.gqa_reduce not in ("mean", "max"):
        raise ValueError(f"gqa_reduce must be 'mean' or 'max', got {policy.gqa_reduce!r}")

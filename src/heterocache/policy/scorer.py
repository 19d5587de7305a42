"""Prefill eviction by a score: the base of a method that is one scoring function.

A ``ScorerPolicy`` keeps, in every (row, layer, KV head), the prompt tokens with the highest
``score`` (the same number in every head: the uniform budget), as kvpress's scorer presses do.
A method written this way is its ``score``; the budget, the padding, the GQA layout and the
store are the engine's. ``heterocache.policy.window_selection`` (SnapKV's selection) is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillContext
from .budgeted import BudgetedPolicy
from .scoring import topk_keep


@dataclass
class ScorerPolicy(BudgetedPolicy):
    """Keep the highest-scoring prompt tokens of every KV head.

    Subclasses implement :meth:`score`; :meth:`protected_tokens` may keep the newest tokens
    regardless of their scores (SnapKV keeps its observation window).

    Args:
        budget: fraction of the prompt KV kept, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; prompt tokens kept per head, overrides ``budget`` (default None).
    """

    def score(self, ctx: PrefillContext) -> torch.Tensor:
        """Importance of every prompt token: float ``[B, H, L]`` per KV head (``ctx.key``'s heads),
        or ``[B, Hq, L]`` per query head (averaged over each GQA group). Higher is kept first;
        padding (``~ctx.valid``) is never kept whatever its score.

        Args:
            ctx: the layer's prompt: ``query [B, Hq, Lq, D]`` (its last ``prompt_queries``
                queries; all ``L`` unless a subclass declares fewer, ``docs/prefill.md``),
                ``key``/``value [B, H, L, D]`` (after RoPE), ``valid [B, L]``, ``scaling``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score(ctx)")

    def protected_tokens(self) -> int:
        """How many of the newest prompt tokens every head keeps before the top scores (default 0)."""
        return 0

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        B, H = ctx.key.shape[:2]
        return self.head_tokens(ctx)[:, None].expand(B, H).clone()

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        scores = self.score(ctx)
        B, H, L = ctx.key.shape[:3]
        if scores.dim() == 3 and scores.shape[1] != H and scores.shape[1] % H == 0:
            scores = scores.float().view(B, H, scores.shape[1] // H, L).mean(2)
        if tuple(scores.shape) != (B, H, L):
            raise ValueError(
                f"{type(self).__name__}.score returned shape {tuple(scores.shape)}; expected [B, H, L] = "
                f"{[B, H, L]} (or [B, Hq, L] per query head)"
            )
        return topk_keep(scores, ctx.key_valid, plan, protect_last=self.protected_tokens())

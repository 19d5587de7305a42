"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.registry import register_method
from ..policy.base import PrefillContext
from ..policy.budget import round_preserving_sum
from ..policy.budgeted import num_layers_of
from ..policy.window_selection import WindowScoredPolicy


def pyramid_budgets(
    head_tokens: torch.Tensor, prompt_tokens: torch.Tensor, window: int, num_layers: int, beta: float
) -> torch.Tensor:
    """Per-layer tokens of one KV head: a linear schedule from bottom to top averaging ``head_tokens``.

    Out of each head's average ``k`` tokens, ``w = min(window, k)`` (the observation window) are kept
    in every layer; the rest ``c = k - w`` is scheduled over the ``m`` layers as in the paper and its
    reference code: the top layer gets ``c / beta``, the bottom ``2c - c / beta``, layers in between
    lie on the line; when the bottom layer would need more than the prompt offers
    (``n - w`` tokens) it gets all of them and the top ``2c - (n - w)``. Real-valued budgets are
    rounded so that they sum to exactly ``m * c`` (the reference code's integer steps lose a few).

    Args:
        head_tokens: int64 ``[B]`` average tokens per head (the uniform budget).
        prompt_tokens: int64 ``[B]`` real prompt tokens.
        window: observation window.
        num_layers: ``m``.
        beta: top layer's share divisor (>= 1; 1 gives a uniform schedule).

    Returns:
        int64 ``[B, m]``, row means equal to ``head_tokens``.
    """
    k = head_tokens.double()
    w = torch.clamp(k, max=float(window))
    c = k - w
    room = prompt_tokens.double() - w
    lo = c / beta
    hi = 2 * c - lo
    too_high = hi > room
    hi = torch.where(too_high, room, hi)
    lo = torch.where(too_high, 2 * c - room, lo)
    if num_layers == 1:
        scheduled = c[:, None]
    else:
        frac = torch.arange(num_layers, dtype=torch.float64, device=k.device) / (num_layers - 1)
        scheduled = hi[:, None] - (hi - lo)[:, None] * frac[None, :]
    scheduled = torch.minimum(scheduled.clamp_min(0.0), room[:, None])
    caps = room.round().long()[:, None].expand_as(scheduled)
    return round_preserving_sum(scheduled, caps) + w.long()[:, None]


@register_method(
    "pyramidkv",
    description="SnapKV's selection with layer budgets shrinking linearly bottom to top (Cai et al. 2024)",
    paper="https://arxiv.org/abs/2406.02069",
)
@dataclass
class PyramidKVPolicy(WindowScoredPolicy):
    """SnapKV's token selection with per-layer budgets that shrink linearly from bottom to top.

    Layer ``l`` keeps ``pyramid_budgets(...)[l]`` tokens per KV head (see ``pyramid_budgets``): the
    budgets average to the uniform budget over the model's full-attention layers, so the total
    matches SnapKV's. Scoring (observation window, pooling, GQA reduction) is SnapKV's, with SnapKV's defaults so the
    two compare like for like (the paper compares them the same way; KVCache-Factory's LongBench
    scripts run both with window 8, kernel 7, max pooling). Decoded tokens are appended, never evicted.

    Args:
        budget: fraction of the prompt KV kept on average per head, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; average prompt tokens per head, overrides ``budget``.
        window, kernel, pooling, gqa_reduce: as SnapKV's (32, 5, "avg", "mean"; see
            ``heterocache.policy.window_selection.WindowScoredPolicy``).
        beta: the top layer keeps ``1 / beta`` of the average (excluding the window). Default 20
            (paper).
    """

    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, bool) or not float(self.beta) >= 1.0:
            raise ValueError(f"beta must be >= 1 (top layer's budget = average / beta), got {self.beta!r}")

    def layer_budgets(self, ctx: PrefillContext) -> torch.Tensor:
        """Tokens per KV head of every layer for this prompt: int64 ``[B, num_layers]``."""
        m = num_layers_of(ctx, "PyramidKV")
        return pyramid_budgets(self.head_tokens(ctx), ctx.prompt_tokens, self.window, m, float(self.beta))

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        B, H = ctx.key.shape[:2]
        return self.layer_budgets(ctx)[:, ctx.layer_idx, None].expand(B, H).clone()


PyramidKVCache = PyramidKVPolicy.cache_class

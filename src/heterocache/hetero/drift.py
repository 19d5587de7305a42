"""Attention scores of a head over the prompt, and the overlap of top-k sets (drift detection)."""

from __future__ import annotations

import torch

from ..policies.scoring import pool_scores


def prompt_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int) -> torch.Tensor:
    """Attention of some queries of a GQA group over prompt keys, pooled, max over the group.

    Args:
        queries: ``[..., steps, G, D]``.
        keys: ``[..., L, D]`` (broadcast over ``steps`` and ``G``).
        scaling: softmax scale.
        kernel: average-pool kernel along the prompt (1 = none).

    Returns:
        float32 ``[..., steps, L]``.
    """
    s = torch.matmul(queries.float(), keys.float().unsqueeze(-3).transpose(-1, -2)) * scaling
    probs = torch.softmax(s, dim=-1)  # [..., steps, G, L]
    return pool_scores(probs, kernel, "avg").amax(-2)


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / k for index sets of equal size k: ``a [..., k]``, ``b [k]`` -> ``[...]``."""
    return torch.isin(a, b).float().mean(-1)

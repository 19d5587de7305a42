"""Attention scores of a head over the prompt, and the overlap of top-k sets (drift detection)."""

from __future__ import annotations

import torch

from ...policy.scoring import pool_scores


def prompt_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                  kernel: int | torch.Tensor) -> torch.Tensor:
    """Attention of some queries of a GQA group over prompt keys, pooled, max over the group.

    Args:
        queries: ``[..., steps, G, D]``.
        keys: ``[..., L, D]`` (broadcast over ``steps`` and ``G``).
        scaling: softmax scale.
        kernel: average-pool kernel along the prompt (1 = none), or per-row taps (``pool_scores``).

    Returns:
        float32 ``[..., steps, L]``.
    """
    s = torch.matmul(queries.float(), keys.float().unsqueeze(-3).transpose(-1, -2)) * scaling
    probs = torch.softmax(s, dim=-1)  # [..., steps, G, L]
    return pool_scores(probs, kernel, "avg").amax(-2)


def pivot_scores(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                 kernel: int | torch.Tensor) -> torch.Tensor:
    """``prompt_scores`` for every pivot and row of a layer at once.

    Args:
        queries: ``[B, P, T, G, D]`` (T buffered steps, G query heads of each pivot's group).
        keys: ``[B, P, L, D]`` each pivot's prompt keys, padded to the longest row.
        valid: bool ``[B, P, L]``: real prompt slots (a prefix of each row).

    Returns:
        float32 ``[B, P, T, L]``; ``-inf`` at padded slots. At real slots exactly what
        ``prompt_scores`` gives for that row alone (the average pool zero-pads either way).
    """
    s = torch.matmul(queries.float(), keys.float().unsqueeze(2).transpose(-1, -2)) * scaling  # [B, P, T, G, L]
    s = s.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(s, dim=-1)
    pooled = pool_scores(probs, kernel, "avg").amax(-2)
    return pooled.masked_fill(~valid[:, :, None, :], float("-inf"))


def topk_sets(scores: torch.Tensor, k: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` index sets with a per-row ``k``.

    Args:
        scores: ``[B, ..., L]``; k: int64 ``[B]`` (device); kmax: ``max(k)`` (host).

    Returns:
        ``tops`` int64 ``[B, ..., kmax]`` best first and ``in_set`` bool, same shape: rank < k.
    """
    tops = scores.topk(kmax, dim=-1).indices
    shape = (k.shape[0],) + (1,) * (tops.dim() - 1)
    in_set = torch.arange(kmax, device=tops.device) < k.view(shape)
    return tops, in_set


def set_overlap(tops: torch.Tensor, in_set: torch.Tensor, reference: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``overlap`` of every top set with its reference set, batched.

    Args:
        tops, in_set: ``[B, P, T, kmax]`` from ``topk_sets``.
        reference: bool ``[B, P, L]`` membership map of each reference set.
        k: int64 ``[B]`` set sizes.

    Returns:
        float32 ``[B, P, T]``: ``|A ∩ B| / k``.
    """
    hit = reference.unsqueeze(2).expand(-1, -1, tops.shape[2], -1).gather(-1, tops) & in_set
    return hit.sum(-1).float() / k.view(-1, 1, 1).float()


def membership(tops: torch.Tensor, in_set: torch.Tensor, length: int) -> torch.Tensor:
    """Bool ``[..., length]`` map of the index sets ``tops[..., :k]`` (``in_set`` marks them)."""
    out = torch.zeros(*tops.shape[:-1], length, dtype=torch.bool, device=tops.device)
    return out.scatter_(-1, tops, in_set)

"""Overlap statistics of top-k sets: stability of a head over time, similarity of heads.

Overlap coefficient of two index sets A, B of equal size k: ``|A ∩ B| / k``.
"""

from __future__ import annotations

import torch


def membership(indices: torch.Tensor, length: int) -> torch.Tensor:
    """bool ``[..., length]``: True at the positions listed in ``indices`` ``[..., k]``."""
    mask = torch.zeros(*indices.shape[:-1], length, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def overlap(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """Overlap ``|A ∩ B| / k`` of index sets ``a``, ``b`` ``[..., k]`` over ``length`` positions.

    Returns:
        float32 ``[...]`` in [0, 1].
    """
    hits = membership(a, length).gather(-1, b)
    return hits.sum(-1, dtype=torch.float32) / a.shape[-1]


def pairwise_overlap(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Overlap of every pair of heads' sets: ``indices`` ``[H, k]`` -> float32 ``[H, H]`` (diagonal 1)."""
    member = membership(indices, length).float()
    return member @ member.T / indices.shape[-1]


def median_over_steps(values: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 (decode steps), averaging the two middle values for an even count
    (numpy's convention, not torch.median's lower median)."""
    if values.shape[0] == 0:
        raise ValueError("no decode steps to take a median over")
    return torch.quantile(values.float(), 0.5, dim=0)

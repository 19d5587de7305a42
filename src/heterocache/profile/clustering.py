"""From statistics to roles: greedy star clustering, unique-head split, budget ratios.

Per layer, heads i and j are neighbours when their similarity is >= tau_sim. Greedy star
clustering: among unassigned heads take the one with the most unassigned neighbours (ties: the
lowest index); it becomes a pivot and its unassigned neighbours its satellites; repeat while some
unassigned head has an unassigned neighbour. Heads left over are unique: anchor when their
stability is >= tau_stable, volatile otherwise.
"""

from __future__ import annotations

import torch

from .roles import Role

#: Keeps 1/S finite for a head whose attention never returns to its prefill set (S = 0).
STABILITY_EPS = 1e-6


def neighbours(similarity: torch.Tensor, tau_sim: float) -> torch.Tensor:
    """bool ``[H, H]`` adjacency: similarity >= tau_sim both ways, no self loops."""
    adjacency = (similarity >= tau_sim) & (similarity.T >= tau_sim)
    adjacency.fill_diagonal_(False)
    return adjacency


def star_clusters(adjacency: torch.Tensor) -> dict[int, list[int]]:
    """Greedy star clustering of one layer.

    Args:
        adjacency: bool ``[H, H]``, symmetric, no self loops.

    Returns:
        ``{pivot: [satellites, ascending]}`` in the order the pivots were picked; heads in no
        cluster are unique.
    """
    adjacency = adjacency.clone()
    adjacency.fill_diagonal_(False)
    unassigned = torch.ones(adjacency.shape[0], dtype=torch.bool)
    clusters: dict[int, list[int]] = {}
    while True:
        degree = (adjacency & unassigned[None, :]).sum(1) * unassigned  # unassigned neighbours
        if int(degree.max()) == 0:
            return clusters
        pivot = int(degree.argmax())  # argmax returns the first maximum: ties go to the lowest index
        satellites = (adjacency[pivot] & unassigned).nonzero().flatten().tolist()
        clusters[pivot] = satellites
        unassigned[pivot] = False
        unassigned[satellites] = False


def assign_roles(
    similarity: torch.Tensor, stability: torch.Tensor, tau_sim: float, tau_stable: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roles and pivots of every head.

    Args:
        similarity: ``[L, H, H]`` head-to-head overlap per layer.
        stability: ``[L, H]`` stability scores.
        tau_sim: neighbour threshold (paper: 0.5; 0.4 for DeepSeek-R1-Distill-Llama-8B).
        tau_stable: anchor/volatile threshold (paper: 0.5).

    Returns:
        ``(roles, pivots)``, int64 ``[L, H]``; pivots is -1 except for satellites.
    """
    layers, heads = stability.shape
    roles = torch.where(stability >= tau_stable, int(Role.ANCHOR), int(Role.VOLATILE)).long()
    pivots = torch.full((layers, heads), -1, dtype=torch.long)
    for layer in range(layers):
        for pivot, satellites in star_clusters(neighbours(similarity[layer], tau_sim)).items():
            roles[layer, pivot] = Role.PIVOT
            roles[layer, satellites] = Role.SATELLITE
            pivots[layer, satellites] = pivot
    return roles, pivots


def budget_ratios(roles: torch.Tensor, stability: torch.Tensor) -> torch.Tensor:
    """Budget share of each compressed head: ``w = 1 / (S + 1e-6)`` normalised to mean 1.

    Less stable heads get more tokens. ``ratio_h = N * w_h / sum(w)`` over the N compressed heads
    (anchor and satellite) of the whole model; NaN for full heads (and everywhere when N = 0).

    Returns:
        float32 ``[L, H]``.
    """
    compressed = (roles == Role.ANCHOR) | (roles == Role.SATELLITE)
    ratios = torch.full(roles.shape, float("nan"), dtype=torch.float32)
    if compressed.any():
        weights = 1.0 / (stability[compressed].double() + STABILITY_EPS)
        ratios[compressed] = (weights * weights.numel() / weights.sum()).float()
    return ratios

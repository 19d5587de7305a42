"""Agreement of two profiles of the same model (``heterocache profile compare``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ProfileError
from .head_profile import HeadProfile
from .roles import Role


@dataclass
class ProfileComparison:
    """How far two profiles agree.

    Attributes:
        heads: KV heads compared (layers × KV heads).
        role_agreement: fraction of heads with the same role.
        role_kappa: Cohen's kappa of the roles (agreement beyond chance; 1 = identical).
        compressed_agreement: fraction of heads on the same side of compressed (anchor,
            satellite) vs full (volatile, pivot).
        confusion: ``confusion[a][b]`` = heads with role a in the first profile and b in the second.
        stability_pearson, stability_spearman: correlation of the stability scores; None when a
            profile has no stability scores or either score vector is constant.
        stability_mean_abs_diff: mean |S_a - S_b|, None as above.
    """

    heads: int
    role_agreement: float
    role_kappa: float
    compressed_agreement: float
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    stability_pearson: float | None = None
    stability_spearman: float | None = None
    stability_mean_abs_diff: float | None = None


def compare_profiles(a: HeadProfile, b: HeadProfile) -> ProfileComparison:
    """Compare two profiles with the same shape (layers and KV heads).

    Raises:
        ProfileError: the shapes differ.
    """
    if a.roles.shape != b.roles.shape:
        raise ProfileError(f"cannot compare profiles of shapes {tuple(a.roles.shape)} and {tuple(b.roles.shape)}")
    ra, rb = a.roles.flatten(), b.roles.flatten()
    n = ra.numel()
    agreement = float((ra == rb).double().mean())
    confusion = {x.label: {y.label: int(((ra == x) & (rb == y)).sum()) for y in Role} for x in Role}
    chance = sum(float((ra == r).double().mean()) * float((rb == r).double().mean()) for r in Role)
    kappa = 1.0 if chance >= 1.0 else (agreement - chance) / (1.0 - chance)
    compressed = float((a.compressed_mask().flatten() == b.compressed_mask().flatten()).double().mean())
    result = ProfileComparison(n, agreement, kappa, compressed, confusion)
    if a.has_stability and b.has_stability:
        sa, sb = a.stability.flatten().double(), b.stability.flatten().double()
        result.stability_pearson = pearson(sa, sb)
        result.stability_spearman = spearman(sa, sb)
        result.stability_mean_abs_diff = float((sa - sb).abs().mean())
    return result


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two 1-D tensors; None when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return None if denominator == 0 else float((x * y).sum()) / denominator


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given the average of their ranks (as scipy's default)."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    start = 0
    while start < x.numel():
        end = start
        while end + 1 < x.numel() and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None when either is constant."""
    return pearson(rankdata(x), rankdata(y))


def format_comparison(c: ProfileComparison, name_a: str = "A", name_b: str = "B") -> str:
    """Human-readable report of a :class:`ProfileComparison`."""

    def num(value: float | None) -> str:
        return "n/a (no stability scores)" if value is None else f"{value:.3f}"

    lines = [
        f"A: {name_a}",
        f"B: {name_b}",
        f"heads compared          {c.heads}",
        f"same role               {c.role_agreement:.3f}  ({round(c.role_agreement * c.heads)} heads)",
        f"role agreement (kappa)  {c.role_kappa:.3f}",
        f"compressed vs full      {c.compressed_agreement:.3f}",
        f"stability Pearson       {num(c.stability_pearson)}",
        f"stability Spearman      {num(c.stability_spearman)}",
        f"stability mean |diff|   {num(c.stability_mean_abs_diff)}",
        "",
        "roles (rows A, columns B)",
        f"{'':<10}" + "".join(f"{r.label:>10}" for r in Role),
    ]
    for row in Role:
        lines.append(f"{row.label:<10}" + "".join(f"{c.confusion[row.label][col.label]:>10}" for col in Role))
    return "\n".join(lines)

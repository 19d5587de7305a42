"""Budget plan of HeteroCache: how many prompt tokens each KV head keeps.

With H KV heads in the model, F of them kept full (volatile and pivot), a prompt of L tokens and a
budget b (fraction of the full prompt KV kept), the compressed heads share ``b*H*L - F*L`` tokens.
Head h gets ``min(L, base * ratio_h)`` with ``base`` chosen so the shares add up: the
``(b*H - F) * L / (H - F)`` of the paper when no head hits the prompt length, and more for the
others when some do (the tokens a clamped head cannot use are redistributed, not lost). Integer
counts are rounded so the total is exact (each head within one token of its real share).
"""

from __future__ import annotations

import torch


class InfeasibleBudgetError(ValueError):
    """The profile keeps more heads full than the budget allows."""


def budget_floor(full: torch.Tensor) -> float:
    """The budget every prompt needs more than: the share of KV heads kept full (volatile and
    pivot). A budget at or below it is infeasible whatever the prompt length."""
    return int(full.sum()) / full.numel()


def check_budget_above_floor(full: torch.Tensor, budget: float, kept: str = "volatile and pivot",
                             hint: str = "") -> None:
    """Raise ``InfeasibleBudgetError`` at construction when ``budget`` is at or below the floor.

    Finite prompts need slightly more (``min_feasible_budget``); that is checked at prefill.
    ``kept`` names the roles kept full, ``hint`` is appended to the message (how to go lower).
    """
    H, F = full.numel(), int(full.sum())
    if F < H and budget <= F / H:
        raise InfeasibleBudgetError(
            f"budget {budget} is too small for this head profile: {F} of {H} KV heads are kept full "
            f"({kept}), so every budget must exceed {F / H:.4f} (a little more for short "
            f"prompts: min_feasible_budget). Use budget > {F / H:.4f}{hint}, or another method for smaller budgets."
        )


#: ``pivot_offload="auto"`` compresses the pivots when that at least multiplies the prompt share
#: each compressed head keeps by this much; below, the paper's layout (pivots full, their
#: satellites refreshed when they drift) is kept. Why 2: docs/heterocache.md#pivot_offload.
PIVOT_OFFLOAD_GAIN = 2.0


def compressed_share(full: torch.Tensor, budget: float) -> float:
    """Mean fraction of the prompt a compressed head keeps when the heads ``full`` (bool
    ``[layers, kv_heads]``) keep everything and the whole budget is ``budget``: ``(b - f) / (1 - f)``
    for the full heads' share ``f``, 0 at or below the floor (infeasible)."""
    f = budget_floor(full)
    return max(0.0, (budget - f) / (1.0 - f)) if f < 1.0 else 0.0


def pivot_offload_pays(volatile: torch.Tensor, pivot: torch.Tensor, budget: float) -> bool:
    """``pivot_offload="auto"``: whether compressing the pivots (bool masks ``[layers, kv_heads]``)
    multiplies the compressed heads' share of the prompt by ``PIVOT_OFFLOAD_GAIN`` or more (always,
    below the volatile-and-pivot floor). For the bundled profiles, on up to budget 0.36 for SmolLM2,
    0.29 for Llama-3.1-8B, 0.31 for Qwen2.5-14B, 0.24 for DeepSeek-R1-Distill-Llama-8B."""
    if not bool(pivot.any()):
        return False
    without = compressed_share(volatile | pivot, budget)
    return without == 0.0 or compressed_share(volatile, budget) >= PIVOT_OFFLOAD_GAIN * without


def min_feasible_budget(full: torch.Tensor, prompt_tokens: int) -> float:
    """Smallest budget with which every compressed head keeps at least one token.

    Args:
        full: bool ``[layers, kv_heads]``: heads kept full.
        prompt_tokens: L.
    """
    H, F = full.numel(), int(full.sum())
    return (F * prompt_tokens + (H - F)) / (H * prompt_tokens)


def plan_tokens(full: torch.Tensor, ratios: torch.Tensor, budget: float, prompt_tokens: int,
                kept: str = "volatile and pivot", hint: str = "") -> torch.Tensor:
    """Prompt tokens kept by every KV head.

    Args:
        full: bool ``[layers, kv_heads]``: heads kept full (volatile, pivot).
        ratios: float ``[layers, kv_heads]``: budget ratio of each compressed head (mean 1 over them;
            ignored for full heads).
        budget: fraction of the prompt KV kept, in (0, 1].
        prompt_tokens: L (real tokens of one batch row).
        kept, hint: the roles kept full and how to go lower, for the error message.

    Returns:
        int64 ``[layers, kv_heads]``: L for full heads, at least 1 and at most L for the others,
        summing to ``round(budget * H * L)`` (unless every head is full).

    Raises:
        InfeasibleBudgetError: the budget cannot even give every compressed head one token.
    """
    L = int(prompt_tokens)
    H, F = full.numel(), int(full.sum())
    out = torch.full(full.shape, L, dtype=torch.long)
    if F == H or L == 0:
        return out
    total = round(budget * H * L) - F * L
    if total < H - F:
        need = min_feasible_budget(full, L)
        raise InfeasibleBudgetError(
            f"budget {budget} is too small for this head profile: {F} of {H} KV heads are kept full "
            f"({kept}), so the smallest feasible budget for a {L}-token prompt is {need:.4f} "
            f"(> {F / H:.4f} for long prompts){hint}"
        )
    comp = ~full
    r = ratios[comp].double().clamp_min(1e-9)
    share = _water_fill(r, float(total), float(L))
    counts = torch.floor(share).long().clamp(1, L)
    remaining = total - int(counts.sum())
    if remaining > 0:
        # Floors lose less than one token per head: the heads with the largest fractional parts
        # (never one already at L) get one more each.
        frac = torch.where(counts < L, share - counts.double(), torch.full_like(share, -1.0))
        counts[torch.argsort(frac, descending=True, stable=True)[:remaining]] += 1
    elif remaining < 0:
        # The one-token minimum overshot: take the excess back, a token at a time from the largest
        # head (at most one per compressed head; feasibility keeps every head at >= 1).
        for _ in range(-remaining):
            counts[torch.argmax(counts)] -= 1
    out[comp] = counts
    return out


def _water_fill(ratios: torch.Tensor, total: float, cap: float) -> torch.Tensor:
    """Shares ``min(cap, base * ratio)`` summing to ``total`` (float64 ``[n]``)."""
    clamped = torch.zeros_like(ratios, dtype=torch.bool)
    for _ in range(len(ratios) + 1):
        free = ~clamped
        left = total - cap * int(clamped.sum())
        base = left / float(ratios[free].sum()) if bool(free.any()) else 0.0
        share = torch.where(clamped, torch.full_like(ratios, cap), base * ratios)
        newly = free & (share > cap)
        if not bool(newly.any()):
            return share
        clamped |= newly
    return share.clamp_max(cap)


#: ``kernel="auto"``: the selection's pooling kernel grows by 2 for every ``AUTO_KERNEL_TOKENS``
#: prompt tokens a compressed head keeps on average, within ``AUTO_KERNEL_RANGE``.
AUTO_KERNEL_TOKENS = 40
AUTO_KERNEL_RANGE = (3, 15)
#: ``kernel="auto"`` when no head is compressed (the kernel then only shapes the drift checks).
AUTO_KERNEL_UNCOMPRESSED = 5


def auto_kernel(plan: torch.Tensor, prompt_tokens: int) -> int:
    """Pooling kernel for a prompt of ``prompt_tokens`` tokens whose heads keep ``plan`` tokens
    (int64 ``[layers, kv_heads]``): ``2 * round(mean / AUTO_KERNEL_TOKENS) + 1`` for the mean prompt
    slots of the compressed heads (those below ``prompt_tokens``), within ``AUTO_KERNEL_RANGE``.

    Why: pooling spreads a peak's score over its neighbours, so that a head keeps a phrase rather
    than its single best token. A head that keeps ~90 of 4096 tokens (SmolLM2 at budget 0.25)
    cannot afford a 15-token phrase per peak and loses more of the answer with it than with 5; one
    that keeps hundreds (budget 0.35 and up, or ``pivot_offload``) loses 4 to 13 times less of it
    with 15 than with 5 (benchmarks/results/answer_likelihood_kernels_smollm2_cpu.json)."""
    compressed = plan[plan < int(prompt_tokens)]
    if compressed.numel() == 0:
        return AUTO_KERNEL_UNCOMPRESSED
    mean = float(compressed.double().mean())
    lo, hi = AUTO_KERNEL_RANGE
    return int(min(hi, max(lo, 2 * round(mean / AUTO_KERNEL_TOKENS) + 1)))

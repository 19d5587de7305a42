"""Budget semantics shared by every compressing method.

A budget says how much of the prompt's KV each (layer, KV head) keeps in accelerator memory, in one
of two forms:

- a *fraction* ``budget`` in (0, 1]: each head keeps ``round(budget * n)`` of the row's ``n`` real
  prompt tokens (NVIDIA kvpress's ``compression_ratio`` is the fraction removed:
  ``budget = 1 - compression_ratio``);
- an absolute count ``budget_tokens`` >= 1: each head keeps ``min(budget_tokens, n)`` tokens (the
  ``max_capacity_prompt`` of SnapKV/PyramidKV's reference code). When given it overrides ``budget``.

Methods that give layers different budgets (PyramidKV, CAKE) spend the same total: their per-layer
budgets *average* to the number above. An integer budget is deliberately not read as a token count:
``budget=1`` must keep meaning "the whole prompt"; pass ``budget_tokens=`` instead.

The budget counts only what can be compressed: the full-attention layers. A sliding-window layer
(e.g. Gemma 3's local layers) keeps exactly its window of ``W - 1`` tokens whatever the budget, and
is left out of the averages (PyramidKV's schedule, CAKE's total and HeteroCache's plan span the
full layers only). With every layer sliding there is nothing to compress.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_budget(budget) -> float:
    """Validate a budget fraction and return it as a float.

    Raises:
        TypeError: not a real number.
        ValueError: outside (0, 1].
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a number in (0, 1] (fraction of the prompt KV kept), got {budget!r}")
    budget = float(budget)
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        hint = (
            f" To keep {int(budget)} tokens per head pass budget_tokens={int(budget)}."
            if budget > 1.0 and budget == int(budget)
            else ""
        )
        raise ValueError(
            f"budget must be in (0, 1] (fraction of the prompt KV kept in GPU memory), got {budget}. "
            f"To remove 75% of the cache use budget=0.25 (kvpress's compression_ratio=0.75).{hint}"
        )
    return budget


def check_budget_tokens(budget_tokens) -> int | None:
    """Validate an absolute per-head token budget (None = not set) and return it as an int.

    Raises:
        TypeError: not an integer.
        ValueError: smaller than 1.
    """
    if budget_tokens is None:
        return None
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, numbers.Integral):
        raise TypeError(f"budget_tokens must be an integer >= 1 (prompt tokens kept per head), got {budget_tokens!r}")
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1 (prompt tokens kept per head), got {budget_tokens}")
    return int(budget_tokens)


def check_budget_spec(budget, budget_tokens=None) -> tuple[float | None, int | None]:
    """Validate a (fraction, absolute) budget pair; at least one must be given.

    ``budget`` may be None only when ``budget_tokens`` is set (which then decides alone).

    Returns:
        ``(budget as float or None, budget_tokens as int or None)``.
    """
    budget_tokens = check_budget_tokens(budget_tokens)
    if budget is None and budget_tokens is None:
        raise TypeError("budget must be a number in (0, 1] (fraction of the prompt KV kept) unless budget_tokens "
                        "(prompt tokens kept per head) is given, got None")
    return (None if budget is None else check_budget(budget)), budget_tokens


def tokens_for_budget(
    budget: float | None, prompt_tokens: torch.Tensor, minimum: int = 1, budget_tokens: int | None = None
) -> torch.Tensor:
    """Tokens one head keeps for a prompt of ``prompt_tokens`` real tokens.

    ``round(budget * n)`` (halves round up), or ``budget_tokens`` when it is set; never fewer than
    ``minimum`` and never more than the prompt.

    Args:
        budget: fraction in (0, 1] (ignored when ``budget_tokens`` is set).
        prompt_tokens: int64 ``[B]`` real (non-padding) prompt tokens per row.
        minimum: at least this many (never more than the prompt).
        budget_tokens: absolute tokens per head, or None.

    Returns:
        int64 ``[B]``.
    """
    if budget_tokens is not None:
        kept = torch.full_like(prompt_tokens, int(budget_tokens), dtype=torch.long)
    else:
        kept = torch.floor(budget * prompt_tokens.double() + 0.5).long()
    return torch.minimum(torch.clamp(kept, min=minimum), prompt_tokens)


def round_preserving_sum(values: torch.Tensor, caps: torch.Tensor | None = None) -> torch.Tensor:
    """Integers close to ``values`` whose row sums equal the rounded row sums of ``values``.

    Largest-remainder rounding along the last axis: floor everything, then give +1 to the entries
    with the largest fractional parts (ties: lower index first). Used to turn real-valued per-layer
    budgets into token counts without losing or inventing tokens.

    Args:
        values: float ``[..., m]``, non-negative.
        caps: optional ``[..., m]`` integer upper bounds with ``values <= caps`` (an entry at its cap
            never receives the +1).

    Returns:
        int64 ``[..., m]``.
    """
    v = values.double()
    floor = torch.floor(v + 1e-9)
    frac = (v - floor).clamp_min(0.0)
    if caps is not None:
        frac = torch.where(floor >= caps.double(), torch.full_like(frac, -1.0), frac)
    missing = torch.round(v.sum(-1) - floor.sum(-1)).long().clamp_min(0)
    order = torch.sort(-frac, dim=-1, stable=True).indices
    rank_ok = torch.arange(v.shape[-1], device=v.device) < missing[..., None]
    bonus = torch.zeros_like(floor).scatter_(-1, order, rank_ok.double())
    return (floor + bonus).long()


def allocate_proportional(total: torch.Tensor, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split a total in proportion to weights, no share above its cap (water-filling).

    What a capped entry cannot take is shared among the others, again in proportion to their
    weights, until nothing exceeds its cap. Free entries whose weights are all zero split equally.
    When the caps add up to less than the total every entry gets its cap (the rest is not spent).

    Args:
        total: ``[B]`` amount to split per row.
        weights: ``[B, m]`` non-negative.
        caps: ``[B, m]`` or ``[B]`` (the same cap for every entry of a row).

    Returns:
        float64 ``[B, m]``: shares with ``0 <= share <= cap`` and row sums ``min(total, sum(caps))``.
    """
    w = weights.double().clamp_min(0.0)
    B, m = w.shape
    caps = caps.double()
    caps = (caps[:, None] if caps.dim() == 1 else caps).expand(B, m)
    total = total.double()
    fixed = torch.zeros(B, m, dtype=torch.bool, device=w.device)
    share = torch.zeros_like(w)
    for _ in range(m + 1):
        free = ~fixed
        room = (total - torch.where(fixed, caps, torch.zeros_like(caps)).sum(-1)).clamp_min(0.0)[:, None]
        wf = torch.where(free, w, torch.zeros_like(w))
        sw = wf.sum(-1, keepdim=True)
        nf = free.sum(-1, keepdim=True).clamp_min(1)
        share = torch.where(sw > 0, room * wf / sw.clamp_min(1e-300), room * free / nf)
        over = free & (share > caps)
        if not bool(over.any()):
            break
        fixed |= over
    return torch.where(fixed, caps, share)

"""Budget semantics shared by every compressing method.

A budget is the fraction of the full prompt KV kept in accelerator memory, in (0, 1]. (NVIDIA
kvpress's ``compression_ratio`` is the fraction removed: ``budget = 1 - compression_ratio``.)
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
        raise ValueError(
            f"budget must be in (0, 1] (fraction of the prompt KV kept in GPU memory), got {budget}. "
            "To remove 75% of the cache use budget=0.25 (kvpress's compression_ratio=0.75)."
        )
    return budget


def tokens_for_budget(budget: float, prompt_tokens: torch.Tensor, minimum: int = 1) -> torch.Tensor:
    """Tokens one head keeps for a prompt of ``prompt_tokens`` real tokens: round(budget * n).

    Args:
        budget: fraction in (0, 1].
        prompt_tokens: int64 ``[B]`` real (non-padding) prompt tokens per row.
        minimum: at least this many (never more than the prompt).

    Returns:
        int64 ``[B]``.
    """
    kept = torch.floor(budget * prompt_tokens.double() + 0.5).long()
    return torch.minimum(torch.clamp(kept, min=minimum), prompt_tokens)

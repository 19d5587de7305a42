"""Top-k attention sets of the newest query: the only thing the profiler keeps per step.

For one layer and step: probabilities of the newest query over the keys it sees (normalised
over all of them, as in the model's own attention), restricted to the prefill positions,
averaged over each GQA group's query heads, smoothed with a 1-D average pool (kernel 5,
stride 1, padding 2, zero padding counted, i.e. torch's default ``count_include_pad=True``),
and reduced to the indices of the k largest values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def newest_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    prefill_len: int,
) -> torch.Tensor:
    """Attention of the newest query over the prefill positions, averaged per GQA group.

    Args:
        query: ``[B, Hq, q_len, D]``; only the last query position is used.
        key: ``[B, Hkv, kv_len, D]``, the keys that query attends to (cache included).
        attention_mask: None (causal, nothing masked for the newest query), a bool mask
            ``[B, 1 or Hq, q_len, >=kv_len]`` (True = attend) or an additive float mask.
        scaling: softmax scale; None means ``1/sqrt(D)``.
        prefill_len: number of leading key positions to keep (the prompt).

    Returns:
        float32 ``[B, Hkv, prefill_len]``: probabilities (masked positions are 0).
    """
    batch, q_heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    q = query[:, :, -1, :].float().reshape(batch, kv_heads, group, dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, key.float()) * scale  # [B, Hkv, G, T]
    if attention_mask is not None:
        row = attention_mask[:, :, -1, :kv_len]  # [B, 1 or Hq, T]
        row = row[:, :, None, :] if row.shape[1] == 1 else row.reshape(batch, kv_heads, group, kv_len)
        if row.dtype == torch.bool:
            scores = scores.masked_fill(~row, float("-inf"))
        else:
            scores = scores + row.float()
    probs = torch.softmax(scores, dim=-1)
    return probs[..., :prefill_len].mean(dim=2)


def pooled_topk(scores: torch.Tensor, k: int, kernel: int = 5) -> torch.Tensor:
    """Indices of the ``k`` largest values of ``scores`` after a 1-D average pool.

    Args:
        scores: ``[..., P]`` attention over P positions.
        k: set size, ``1 <= k <= P``.
        kernel: odd pool width (stride 1, padding ``kernel // 2``, so the length is kept).

    Returns:
        int64 ``[..., k]`` positions (in no particular order: they are used as sets).
    """
    length = scores.shape[-1]
    if not 1 <= k <= length:
        raise ValueError(f"top-k size {k} must be in [1, {length}]")
    if kernel % 2 != 1:
        raise ValueError(f"pool kernel must be odd to keep positions aligned, got {kernel}")
    flat = scores.reshape(-1, 1, length)
    if kernel > 1:
        flat = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    return flat.topk(k, dim=-1, sorted=False).indices.reshape(*scores.shape[:-1], k)


def effective_topk(prompt_len: int, topk: int, max_fraction: float = 0.25) -> int:
    """Set size for a prompt of ``prompt_len`` tokens: ``min(topk, floor(max_fraction * prompt_len))``.

    With k close to the prompt length every set covers almost every position and all overlaps
    approach 1, so short prompts use at most ``max_fraction`` of their positions (paper settings,
    k=1024 of 5000 tokens, are not affected at the default 0.25). At least 1.
    """
    if prompt_len < 1:
        raise ValueError("empty prompt")
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    return max(1, min(topk, int(max_fraction * prompt_len)))

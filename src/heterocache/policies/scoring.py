"""Token importance from the attention of the last prompt queries (the observation window)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scaling: float,
    chunk: int = 8192,
) -> torch.Tensor:
    """Attention of the last ``window`` queries over all keys, summed over those queries.

    Computed in key chunks with a two-pass softmax so that at most ``window x chunk`` scores per
    head exist at once (no ``L x L`` matrix, no eager attention).

    Args:
        query: ``[B, Hq, L, D]``.
        key: ``[B, H, L, D]`` (``Hq = H * G``).
        valid: bool ``[B, L]`` real tokens.
        window: number of last queries (clamped to L).
        scaling: softmax scale.
        chunk: keys per chunk.

    Returns:
        float32 ``[B, Hq, L]``: for each query head, summed attention probability of each key
        (0 for padding keys and for keys in the future of a window query).
    """
    B, Hq, L, D = query.shape
    H = key.shape[1]
    G = Hq // H
    w = min(window, L)
    q = query[:, :, L - w :, :].float().reshape(B, H, G * w, D)
    q_pos = torch.arange(L - w, L, device=query.device).repeat(G)  # [G*w] position of each query row

    def chunk_scores(lo: int, hi: int) -> torch.Tensor:
        k = key[:, :, lo:hi, :].float()
        s = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, G*w, c]
        k_pos = torch.arange(lo, hi, device=query.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & valid[:, None, None, lo:hi]
        return s.masked_fill(~allowed, float("-inf"))

    # Pass 1: online softmax statistics (max and normaliser) of every window query.
    row_max = torch.full((B, H, G * w), float("-inf"), device=query.device)
    row_sum = torch.zeros(B, H, G * w, device=query.device)
    for lo in range(0, L, chunk):
        s = chunk_scores(lo, min(L, lo + chunk))
        new_max = torch.maximum(row_max, s.amax(-1))
        safe = torch.nan_to_num(new_max, neginf=0.0)
        row_sum = row_sum * torch.exp(row_max - safe) + torch.exp(s - safe[..., None]).sum(-1)
        row_max = new_max
    row_max = torch.nan_to_num(row_max, neginf=0.0)
    inv_sum = 1.0 / row_sum.clamp_min(1e-30)
    # Pass 2: normalised probabilities, summed over the window queries.
    out = torch.empty(B, H, G, L, device=query.device)
    for lo in range(0, L, chunk):
        hi = min(L, lo + chunk)
        p = torch.exp(chunk_scores(lo, hi) - row_max[..., None]) * inv_sum[..., None]
        out[..., lo:hi] = p.view(B, H, G, w, hi - lo).sum(3)
    return out.reshape(B, Hq, L)


def pool_scores(scores: torch.Tensor, kernel: int, mode: str = "avg") -> torch.Tensor:
    """1-D pooling along the token axis (stride 1, 'same' length) to keep neighbours together.

    Args:
        scores: ``[..., L]``.
        kernel: odd window size; 1 disables pooling.
        mode: "avg" or "max".
    """
    if kernel <= 1:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if mode == "avg":
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif mode == "max":
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {mode!r}")
    return x.reshape(shape)


def reduce_gqa(scores: torch.Tensor, num_heads: int, mode: str = "mean") -> torch.Tensor:
    """Query-head scores ``[B, Hq, L]`` to KV-head scores ``[B, H, L]`` (mean or max over the group)."""
    B, Hq, L = scores.shape
    grouped = scores.view(B, num_heads, Hq // num_heads, L)
    if mode == "mean":
        return grouped.mean(2)
    if mode == "max":
        return grouped.amax(2)
    raise ValueError(f"gqa_reduce must be 'mean' or 'max', got {mode!r}")


def topk_keep(scores: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor, protect_last: int = 0) -> torch.Tensor:
    """Keep mask with the ``counts`` highest-scoring real tokens per row and head.

    Args:
        scores: ``[B, H, L]``.
        valid: bool ``[B, L]``.
        counts: int64 ``[B, H]`` tokens to keep (<= real tokens of the row).
        protect_last: the last this-many real tokens of each row are kept first (latest first).

    Returns:
        bool ``[B, H, L]``; kept tokens stay in their original order in the store.
    """
    B, H, L = scores.shape
    s = scores.float().clone()
    if protect_last > 0:
        # Rank from the end among real tokens; the window outranks every score, newest first.
        from_end = torch.flip(torch.cumsum(torch.flip(valid.long(), [-1]), -1), [-1])  # 1 = last real token
        protected = valid & (from_end <= protect_last)
        bonus = (protect_last + 1 - from_end).float() + 1e6
        s = torch.where(protected[:, None, :], bonus[:, None, :].expand(B, H, L), s)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    kmax = int(counts.max()) if counts.numel() else 0
    keep = torch.zeros(B, H, L, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return keep
    idx = s.topk(kmax, dim=-1).indices  # [B, H, kmax], best first
    take = torch.arange(kmax, device=scores.device)[None, None, :] < counts[:, :, None]
    keep.scatter_(-1, idx, take)
    return keep

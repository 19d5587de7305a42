"""Attention of new queries over a ragged per-head KV store, in plain PyTorch.

Two paths:
- ``decode_attention``: one query token per row (the decode step), with two strategies that read
  the packed buffers in place (no copy of the cache, no padding to the longest head):
  ``"blocks"`` views the flat buffers as ``[num_blocks, block_size, D]`` blocks with one owner
  segment each, so a whole layer is two batched matmuls and a segment-wise softmax (max and sum
  reduced per segment); loop-free, good on GPUs. ``"segments"`` runs SDPA on each segment's
  contiguous slice; a Python loop over (row, head), but CPU matmul kernels are far faster on one
  long slice than on many tiny blocks; when every segment has the same capacity it is one SDPA
  call over a strided ``[B, H, cap, D]`` view instead. On CUDA with triton installed the split-K Triton kernel of
  ``heterocache.kernels`` is used instead (strategy ``"kernel"``); all are tested against the
  general oracle ``heterocache.kernels.ragged_decode_attention_torch``.
- ``extend_attention``: several query tokens on a non-empty store (a second turn appended to a
  cached conversation). Rare, so it pads the stored part to a dense tensor and calls SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .store import RaggedKVStore


def decode_attention(
    store: RaggedKVStore, query: torch.Tensor, scaling: float, strategy: str | None = None
) -> torch.Tensor:
    """Single-token attention of every query head over its KV head's stored tokens.

    Args:
        store: the layer's store; every segment must hold at least one token.
        query: ``[B, Hq, 1, D]`` with ``Hq = H * G`` (query head ``h * G + g`` reads KV head ``h``).
        scaling: softmax scale.
        strategy: "segments", "blocks" or "kernel" (``heterocache.kernels`` dispatcher: Triton on
            CUDA). Default: "segments" on CPU, "kernel" on CUDA when triton is installed, else
            "blocks".

    Returns:
        ``[B, 1, Hq, D]`` (the layout attention functions return), in the query's dtype.
    """
    if strategy is None:
        strategy = _default_strategy(store.device)
    if strategy == "kernel":
        B, Hq, _, D = query.shape
        q = query.reshape(store.num_segments, Hq // store.num_heads, D).to(store.dtype)
        out = kernels.ragged_decode_attention(q, store.k, store.v, store.start, store.length, scaling)
        return out.to(query.dtype).view(B, 1, Hq, D)
    if strategy == "segments":
        dense = _decode_uniform(store, query, scaling)
        return dense if dense is not None else _decode_segments(store, query, scaling)
    if strategy == "blocks":
        return _decode_blocks(store, query, scaling)
    raise ValueError(f"strategy must be 'segments', 'blocks' or 'kernel', got {strategy!r}")


def _default_strategy(device: torch.device) -> str:
    if device.type == "cpu":
        return "segments"
    if device.type == "cuda" and kernels.triton_available():
        return "kernel"
    return "blocks"


def _decode_uniform(store: RaggedKVStore, query: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """One SDPA call for the whole layer when every segment has the same capacity (FullKV and the
    uniform-budget methods): the flat buffers are then a strided ``[B, H, cap, D]`` tensor, read in
    place; shorter segments are masked. None when the capacities differ (HeteroCache, PyramidKV)."""
    cap = store.cap
    if cap.numel() == 0 or not bool((cap == cap[0]).all()):
        return None
    B, Hq, _, D = query.shape
    H, c = store.num_heads, int(cap[0])
    if int(store.start[-1]) != (store.num_segments - 1) * c:  # segments not laid out back to back
        return None
    n = int(store.length.max())
    k = store.k[: store.num_segments * c].view(B, H, c, D)[:, :, :n]
    v = store.v[: store.num_segments * c].view(B, H, c, D)[:, :, :n]
    mask = None
    if bool((store.length != n).any()):
        valid = torch.arange(n, device=store.device)[None, :] < store.length[:, None]  # [S, n]
        mask = valid.view(B, H, 1, 1, n).expand(B, H, Hq // H, 1, n).reshape(B, Hq, 1, n)
    out = F.scaled_dot_product_attention(query.to(store.dtype), k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.to(query.dtype).transpose(1, 2)


def _decode_segments(store: RaggedKVStore, query: torch.Tensor, scaling: float) -> torch.Tensor:
    B, Hq, _, D = query.shape
    G = Hq // store.num_heads
    q = query.reshape(store.num_segments, 1, G, D).to(store.dtype)
    out = torch.empty(store.num_segments, G, D, dtype=store.dtype, device=store.device)
    for s, (lo, n) in enumerate(zip(store.start.tolist(), store.length.tolist())):
        k, v = store.k[lo : lo + n].unsqueeze(0), store.v[lo : lo + n].unsqueeze(0)
        out[s] = F.scaled_dot_product_attention(q[s], k, v, scale=scaling)[0]
    return out.to(query.dtype).view(B, 1, Hq, D)


def _decode_blocks(store: RaggedKVStore, query: torch.Tensor, scaling: float) -> torch.Tensor:
    B, Hq, q_len, D = query.shape
    H, bs = store.num_heads, store.block_size
    G = Hq // H
    S = B * H
    owner = store.block_owner
    q = query.reshape(S, G, D).to(store.dtype)
    kb = store.k.view(-1, bs, D)
    vb = store.v.view(-1, bs, D)
    # [NB, G, bs]: every block scored by the G query heads of its owner segment.
    scores = torch.bmm(q[owner], kb.transpose(1, 2)).float() * scaling
    slot = store.block_offset[:, None] + torch.arange(bs, device=store.device)[None, :]
    valid = slot < store.length[owner][:, None]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    seg_max = torch.full((S, G), float("-inf"), device=store.device)
    seg_max.scatter_reduce_(0, owner[:, None].expand(-1, G), scores.amax(-1), reduce="amax")
    probs = torch.exp(scores - seg_max[owner][:, :, None])
    denom = torch.zeros(S, G, device=store.device).index_add_(0, owner, probs.sum(-1))
    partial = torch.bmm(probs.to(store.dtype), vb).float()  # [NB, G, D]
    out = torch.zeros(S, G, D, device=store.device).index_add_(0, owner, partial)
    out = out / denom[:, :, None]
    return out.to(query.dtype).view(B, 1, Hq, D)


def extend_attention(
    store: RaggedKVStore,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    new_valid: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of q new tokens over the stored tokens plus themselves (causal).

    Args:
        store: the layer's store (tokens already cached, all in the past of the new ones).
        query: ``[B, Hq, q, D]``.
        key, value: ``[B, H, q, D]`` of the new tokens (not yet in the store).
        new_valid: optional bool ``[B, q]``: False for padding among the new tokens.
        scaling: softmax scale.

    Returns:
        ``[B, q, Hq, D]``.
    """
    B, Hq, q_len, D = query.shape
    H = store.num_heads
    G = Hq // H
    k_old, v_old, valid_old, _ = store.padded()
    k_all = torch.cat([k_old.to(key.dtype), key], dim=2)
    v_all = torch.cat([v_old.to(value.dtype), value], dim=2)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
    new_mask = causal[None, None].expand(B, H, q_len, q_len)
    if new_valid is not None:
        new_mask = new_mask & new_valid[:, None, None, :]
    mask = torch.cat([valid_old[:, :, None, :].expand(-1, -1, q_len, -1), new_mask], dim=-1)
    # A padding query may see nothing; let it see itself so its (ignored) output is not NaN.
    mask = _with_diagonal(mask, k_old.shape[2])
    out = F.scaled_dot_product_attention(
        query.view(B, H, G, q_len, D).reshape(B * H, G, q_len, D),
        k_all.reshape(B * H, 1, -1, D).expand(-1, G, -1, -1),
        v_all.reshape(B * H, 1, -1, D).expand(-1, G, -1, -1),
        attn_mask=mask.reshape(B * H, 1, q_len, -1),
        scale=scaling,
    )
    return out.view(B, Hq, q_len, D).transpose(1, 2)


def _with_diagonal(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Let every new token attend to itself (column ``offset + i`` for query i)."""
    q_len = mask.shape[2]
    eye = torch.eye(q_len, dtype=torch.bool, device=mask.device)
    mask = mask.clone()
    mask[..., offset:] |= eye
    return mask

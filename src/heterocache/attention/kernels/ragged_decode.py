"""Decode attention over a ragged per-head KV store: the plain-PyTorch reference.

Layout (shared by every backend in :mod:`heterocache.attention.kernels`):

- ``k_buf``, ``v_buf``: ``[T, D]`` flat packed buffers of one layer (fp16, bf16 or fp32).
- Segment ``s = batch_row * num_kv_heads + kv_head`` (``S`` segments) owns the slots
  ``[seg_start[s], seg_start[s] + seg_len[s])``. Any other slot is garbage and never read.
- ``q``: ``[S, G, D]``; the ``G`` query heads of a GQA group all attend to segment ``s``.
- Output ``[S, G, D]`` in ``q``'s dtype; optional log-sum-exp ``[S, G]`` fp32 (natural log,
  ``-inf`` for an empty segment, whose output is zeros).

The reference cuts every segment into blocks of ``block_size`` tokens, gathers the blocks'
slots (positions past the segment's end point at its last used slot, so garbage is never read),
and runs a segment-wise online softmax over chunks of blocks: two batched matmuls per chunk,
maxima and sums reduced per segment with ``scatter_reduce`` / ``index_add``. There is no loop over
segments and no padding to the longest segment; the chunk loop only bounds temporary memory.
"""

from __future__ import annotations

import torch

__all__ = ["ragged_decode_attention_torch", "check_decode_inputs"]


def check_decode_inputs(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
) -> tuple[int, int, int]:
    """Validate the shared decode-attention contract and return ``(S, G, D)``.

    Raises:
        ValueError: on a shape, dtype or device mismatch.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [S, G, D], got shape {tuple(q.shape)}")
    S, G, D = q.shape
    if k_buf.dim() != 2 or v_buf.dim() != 2 or k_buf.shape != v_buf.shape or k_buf.shape[1] != D:
        raise ValueError(
            f"k_buf and v_buf must both be [T, {D}], got {tuple(k_buf.shape)} and {tuple(v_buf.shape)}"
        )
    if seg_start.shape != (S,) or seg_len.shape != (S,):
        raise ValueError(
            f"seg_start and seg_len must be [{S}], got {tuple(seg_start.shape)} and {tuple(seg_len.shape)}"
        )
    if seg_start.dtype != torch.int64 or seg_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seg_start must be int64 and seg_len int32/int64, got {seg_start.dtype}, {seg_len.dtype}")
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed or k_buf.dtype not in allowed or v_buf.dtype != k_buf.dtype:
        raise ValueError(
            f"q, k_buf, v_buf must be fp16/bf16/fp32 (k and v alike), got {q.dtype}, {k_buf.dtype}, {v_buf.dtype}"
        )
    devices = {t.device for t in (q, k_buf, v_buf, seg_start, seg_len)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return S, G, D


def ragged_decode_attention_torch(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    scale: float,
    *,
    return_lse: bool = False,
    block_size: int = 64,
    max_chunk_tokens: int = 1 << 20,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Single-token attention of each segment's ``G`` query heads over its own KV slots.

    Plain PyTorch (CPU or GPU), fp32 accumulation. One host sync (the number of blocks).

    Args:
        q: ``[S, G, D]`` queries, fp16/bf16/fp32.
        k_buf, v_buf: ``[T, D]`` packed keys / values (same dtype as each other).
        seg_start: int64 ``[S]`` first slot of each segment.
        seg_len: int32/int64 ``[S]`` used slots of each segment (0 allowed).
        scale: softmax scale (usually ``D ** -0.5``).
        return_lse: also return the log-sum-exp of the scaled scores.
        block_size: tokens per gathered block (default 64); only padding granularity.
        max_chunk_tokens: bound on the tokens gathered at once (default 2**20), which bounds the
            temporary memory to about ``max_chunk_tokens * D * 8`` bytes plus scores.

    Returns:
        ``out`` ``[S, G, D]`` in ``q.dtype`` (zeros for an empty segment), or ``(out, lse)`` with
        ``lse`` fp32 ``[S, G]`` (``-inf`` for an empty segment) when ``return_lse``.
    """
    S, G, D = check_decode_inputs(q, k_buf, v_buf, seg_start, seg_len)
    dev = q.device
    bs = int(block_size)
    lens = seg_len.to(torch.long)
    nblk = (lens + bs - 1) // bs
    owner = torch.repeat_interleave(torch.arange(S, device=dev), nblk)  # [NB] segment of each block
    NB = owner.numel()

    m = torch.full((S, G), float("-inf"), device=dev)
    l = torch.zeros(S, G, device=dev)
    acc = torch.zeros(S, G, D, device=dev)
    if NB:
        first = torch.cumsum(nblk, 0) - nblk
        tok = (torch.arange(NB, device=dev) - first[owner])[:, None] * bs + torch.arange(bs, device=dev)
        own_len = lens[owner][:, None]
        valid = tok < own_len  # [NB, bs]
        # Clamp to the segment's last used slot: padding positions read real data, never garbage
        # (a NaN there would survive the zero probability: 0 * NaN = NaN).
        slot = seg_start[owner][:, None] + torch.minimum(tok, own_len - 1)
        qf = q.float()
        per_chunk = max(1, int(max_chunk_tokens) // bs)
        for c0 in range(0, NB, per_chunk):
            own = owner[c0 : c0 + per_chunk]
            idx = slot[c0 : c0 + per_chunk]
            kb = k_buf[idx].float()  # [nb, bs, D]
            scores = torch.bmm(qf[own], kb.transpose(1, 2)).mul_(scale)  # [nb, G, bs]
            del kb
            scores.masked_fill_(~valid[c0 : c0 + per_chunk, None, :], float("-inf"))
            own_g = own[:, None].expand(-1, G)
            cmax = torch.full((S, G), float("-inf"), device=dev)
            cmax.scatter_reduce_(0, own_g, scores.amax(-1), reduce="amax")
            m_new = torch.maximum(m, cmax)
            # Segments seen in no chunk yet keep m = -inf; shift by 0 there to avoid -inf - -inf.
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - shift)  # 0 where m = -inf (their l and acc are still 0)
            p = torch.exp(scores - shift[own][:, :, None])  # masked positions: exp(-inf) = 0
            del scores
            vb = v_buf[idx].float()
            l = l * alpha + torch.zeros(S, G, device=dev).index_add_(0, own, p.sum(-1))
            acc = acc * alpha[:, :, None] + torch.zeros(S, G, D, device=dev).index_add_(0, own, torch.bmm(p, vb))
            del p, vb
            m = m_new

    nonempty = l > 0
    out = acc / torch.where(nonempty, l, torch.ones_like(l))[:, :, None]
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, l, torch.ones_like(l))),
                      m.new_tensor(float("-inf")))
    return out, lse

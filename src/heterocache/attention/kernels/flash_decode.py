"""Optional flash-attn backend for ragged decode attention (``flash_attn_varlen_func``).

Each segment is one varlen "sequence" with one query token per head: ``G`` query heads over
one KV head. When the segments lie back to back in order (``seg_start[s + 1] == seg_start[s] +
seg_len[s]``) the packed buffers are read in place; otherwise the used slots are gathered first.
fp16/bf16 only (a flash-attn limit). Untested here: flash-attn is not installed on the dev or
GPU machines; the tests skip without it.
"""

from __future__ import annotations

import torch

from .ragged_decode import check_decode_inputs

try:
    from flash_attn import flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except ImportError:
    flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False

__all__ = ["HAS_FLASH_ATTN", "ragged_decode_attention_flash"]


def ragged_decode_attention_flash(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    scale: float,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``ragged_decode_attention_torch``; needs flash-attn and CUDA fp16/bf16.

    Two host syncs (contiguity check and ``max_seqlen_k``).
    """
    if not HAS_FLASH_ATTN:
        raise ImportError("ragged_decode_attention_flash needs flash-attn")
    S, G, D = check_decode_inputs(q, k_buf, v_buf, seg_start, seg_len)
    if k_buf.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash-attn supports fp16/bf16 only, got {k_buf.dtype}")
    dev = q.device
    lens = seg_len.to(torch.int32)
    cu_k = torch.zeros(S + 1, dtype=torch.int32, device=dev)
    cu_k[1:] = torch.cumsum(lens, 0)
    in_order = S == 0 or bool((seg_start[1:] == seg_start[:-1] + seg_len[:-1].long()).all())
    if in_order:
        base = int(seg_start[0]) if S else 0
        k, v = k_buf[base:], v_buf[base:]
    else:
        nz = lens.long()
        owner = torch.repeat_interleave(torch.arange(S, device=dev), nz)
        offs = torch.arange(owner.numel(), device=dev) - (cu_k[:-1].long())[owner]
        slots = seg_start[owner] + offs
        k, v = k_buf[slots], v_buf[slots]
    cu_q = torch.arange(S + 1, dtype=torch.int32, device=dev)
    max_k = int(lens.max()) if S else 0
    res = flash_attn_varlen_func(
        q.to(k.dtype).contiguous(),  # [S, G, D]: total_q = S, nheads = G
        k.unsqueeze(1),  # [total_k, 1, D]
        v.unsqueeze(1),
        cu_q, cu_k, 1, max(max_k, 1),
        softmax_scale=float(scale), causal=False, return_attn_probs=return_lse,
    )
    out, lse = (res[0], res[1]) if return_lse else (res, None)
    empty = (lens == 0)[:, None]
    out = torch.where(empty[:, :, None], torch.zeros_like(out), out).to(q.dtype)
    if not return_lse:
        return out
    lse = lse.float()
    lse = lse.transpose(0, 1) if lse.shape == (G, S) else lse.reshape(S, G)  # flash-attn: [nheads, total_q]
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    return out, lse

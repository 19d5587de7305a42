"""Decode attention as registered torch ops: one dispatcher op per layer step, which
``torch.compile`` traces as a single node and a CUDA graph replays as its launches.

- ``heterocache::block_decode``: the block-wise PyTorch computation (any device): what the GPU
  decode path runs where Triton cannot (CPU under ``HETEROCACHE_DECODE=strategy=device``, CI).
- ``heterocache::ragged_decode_triton``: the split-K Triton kernel as a ``torch.library.triton_op``
  (registered when triton imports), so ``torch.compile`` sees through it to the kernels instead of
  breaking the graph.

Both have fake (meta) implementations: shapes only, for tracing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

__all__ = ["block_decode", "ragged_decode_triton"]


@torch.library.custom_op("heterocache::block_decode", mutates_args=())
def block_decode(q: Tensor, k_buf: Tensor, v_buf: Tensor, seg_len: Tensor, block_owner: Tensor,
                 block_offset: Tensor, scale: float, block_size: int) -> Tensor:
    """Decode attention of every segment's ``G`` query heads over its stored tokens, block by block.

    Args:
        q: ``[S, G, D]`` in the buffers' dtype.
        k_buf, v_buf: ``[NB * block_size, D]``: the store's blocks.
        seg_len: int ``[S]`` tokens of each segment (>= 1).
        block_owner: int64 ``[NB]`` the segment each block belongs to; block_offset: int64
            ``[NB]`` the position of the block's first slot within its segment.
        scale: softmax scale. block_size: slots per block.

    Returns:
        ``[S, G, D]`` float32. No host reads; every shape comes from the inputs' shapes.
    """
    S, G, D = q.shape
    owner = block_owner
    kb, vb = k_buf.view(-1, block_size, D), v_buf.view(-1, block_size, D)
    # [NB, G, bs]: every block scored by the G query heads of its owner segment.
    scores = torch.bmm(q[owner], kb.transpose(1, 2)).float() * scale
    slot = block_offset[:, None] + torch.arange(block_size, device=q.device)[None, :]
    scores.masked_fill_((slot >= seg_len[owner][:, None])[:, None, :], float("-inf"))
    seg_max = torch.full((S, G), float("-inf"), device=q.device)
    seg_max.scatter_reduce_(0, owner[:, None].expand(-1, G), scores.amax(-1), reduce="amax")
    probs = torch.exp(scores - seg_max[owner][:, :, None])
    denom = torch.zeros(S, G, device=q.device).index_add_(0, owner, probs.sum(-1))
    partial = torch.bmm(probs.to(vb.dtype), vb).float()  # [NB, G, D]
    out = torch.zeros(S, G, D, device=q.device).index_add_(0, owner, partial)
    return out / denom[:, :, None]


@block_decode.register_fake
def _(q, k_buf, v_buf, seg_len, block_owner, block_offset, scale, block_size):
    return q.new_empty(q.shape, dtype=torch.float32)


ragged_decode_triton = None
if importlib.util.find_spec("triton") is not None:
    from torch.library import triton_op

    @triton_op("heterocache::ragged_decode_triton", mutates_args={})
    def ragged_decode_triton(q: Tensor, k_buf: Tensor, v_buf: Tensor, seg_start: Tensor, seg_len: Tensor,
                             scale: float, num_splits: int, max_len: int) -> Tensor:
        """``ragged_decode_attention_triton`` with a fixed launch shape (``num_splits``,
        ``max_len`` from host values: no sync), as one op: ``[S, G, D]`` in ``q.dtype``."""
        from .triton_decode import ragged_decode_attention_triton

        return ragged_decode_attention_triton(q, k_buf, v_buf, seg_start, seg_len, scale,
                                              num_splits=num_splits, max_len=max_len)

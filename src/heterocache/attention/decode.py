"""Attention of one new query token per row over a ragged per-head KV store (the decode step).

``decode_attention`` follows the layer's ``DecodePlan`` (:mod:`heterocache.attention.plan`):
"uniform" and "segments" run SDPA (one call over a strided view, or one per segment); "device"
runs the split-K Triton kernel of ``heterocache.attention.kernels``, or, where Triton cannot run,
the loop-free "blocks" computation: the flat buffers viewed as ``[num_blocks, block_size, D]``
blocks with one owner segment each, two batched matmuls and a segment-wise softmax. Neither reads
a device value on the host. All are tested against
``heterocache.attention.kernels.ragged_decode_attention_torch``. ``selected_decode_attention``
reads only the slots a per-step selection policy chose (``SlotSelection``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..store.ragged import RaggedKVStore
from . import kernels
from .kernels import ops as kernel_ops
from .plan import DecodePlan, plan_decode, resolve_strategy


def decode_step(store: RaggedKVStore, key, value, positions, query, scaling: float, plan: DecodePlan) -> torch.Tensor:
    """The device half of one layer's decode step: append the new token (``append_decode``) and
    attend over the store. Device ops only; every host decision (growth, the mirror update, the
    plan) was taken before (``RaggedKVStore.begin_decode_append``, ``DecodePlanner``), so this
    can be captured whole by ``torch.compile(fullgraph=True)`` and replayed while the plan holds.

    Returns:
        ``[B, 1, Hq, D]``.
    """
    store.append_decode(key, value, positions)
    return decode_attention(store, query, scaling, plan=plan)


def decode_attention(
    store: RaggedKVStore,
    query: torch.Tensor,
    scaling: float,
    strategy: str | None = None,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """Single-token attention of every query head over its KV head's stored tokens.

    Args:
        store: the layer's store; every segment must hold at least one token.
        query: ``[B, Hq, 1, D]`` with ``Hq = H * G`` (query head ``h * G + g`` reads KV head ``h``).
        scaling: softmax scale.
        strategy: see ``resolve_strategy`` (ignored when ``plan`` is given).
        plan: the layer's ``DecodePlan`` (default: planned here).

    Returns:
        ``[B, 1, Hq, D]`` (the layout attention functions return), in the query's dtype.
    """
    if plan is None:
        plan = plan_decode(store, resolve_strategy(store.device, strategy))
    if plan.strategy == "uniform":
        return _decode_uniform(store, query, scaling, plan)
    if plan.strategy == "segments":
        return _decode_segments(store, query, scaling, plan)
    if plan.strategy == "blocks":
        return _decode_blocks(store, query, scaling)
    if plan.strategy in ("device", "kernel"):
        return _decode_device(store, query, scaling, plan)
    raise ValueError(f"unknown plan strategy {plan.strategy!r}")


@dataclass(frozen=True)
class SlotSelection:
    """The stored slots each segment attends to at one decode step (a per-step selection policy's
    choice, e.g. Quest's pages), built on the device without host reads.

    Attributes:
        slots: int64 ``[S, N]`` flat slot indices into the store's buffers (``N`` fixed for the
            step from host values, so shapes never depend on device values); or ``[S * G, N]``:
            one selection per query head (row ``s * G + g`` for query head ``g`` of segment ``s``).
        valid: bool ``[R, N]`` (R the rows of ``slots``): False for entries that pad a row's choice
            (never attended). Every row must have at least one valid entry (the PyTorch path
            would give NaN, the kernel zeros).
        extra_key, extra_value: optional ``[R, M, D]`` tokens attended besides the store's (keys
            rebuilt from a compressed form, values fetched from host memory: ShadowKV, offloaded
            layers), with ``extra_valid`` bool ``[R, M]``.
    """

    slots: torch.Tensor
    valid: torch.Tensor
    extra_key: torch.Tensor | None = None
    extra_value: torch.Tensor | None = None
    extra_valid: torch.Tensor | None = None


def selected_decode_attention(store: RaggedKVStore, query: torch.Tensor, scaling: float,
                              selection: SlotSelection, backend: str | None = None) -> torch.Tensor:
    """Single-token attention of every query head over the slots its KV head's segment selected.

    Reads only the selected keys and values (one gather of ``[S, N, D]``), on every device; a
    segment attends exactly as ``decode_attention`` would over a store holding only those tokens.

    Args:
        query: ``[B, Hq, 1, D]``.
        selection: the step's ``SlotSelection``; every segment must select at least one valid slot.
        backend: the kernel backend (``kernels.resolve_backend``; default: resolved here). The
            cache passes its planner's, resolved once per step.

    Returns:
        ``[B, 1, Hq, D]`` in the query's dtype.
    """
    B, Hq, _, D = query.shape
    S, G = store.num_segments, Hq // store.num_heads
    R = selection.slots.shape[0]
    if R == S * G and G > 1:
        G = 1  # one selection per query head (row s * G + g): each query head reads its own slots
    elif R != S:
        raise ValueError(f"a selection has {S} rows (one per KV head) or {S * G} (one per query head), got {R}")
    if selection.extra_key is not None and selection.extra_key.shape[0] != R:
        raise ValueError(f"extra tokens must have the selection's {R} rows, got {selection.extra_key.shape[0]}")
    if backend is None:
        backend = kernels.resolve_backend(store.device)
    if selection.extra_key is None and backend == "triton":
        # The Triton kernel reads the chosen slots in place through the table (no gather copy).
        q = query.reshape(R, G, D).to(store.dtype)
        out = kernels.triton_decode.table_decode_attention_triton(
            q, store.k, store.v, selection.slots, selection.valid, scaling)
        return out.to(query.dtype).view(B, 1, Hq, D)
    k, v, valid = store.k[selection.slots], store.v[selection.slots], selection.valid  # [S, N, D]
    if selection.extra_key is not None:
        k = torch.cat([k, selection.extra_key.to(store.dtype)], 1)
        v = torch.cat([v, selection.extra_value.to(store.dtype)], 1)
        valid = torch.cat([valid, selection.extra_valid], 1)
    k, v = k.unsqueeze(1), v.unsqueeze(1)  # [R, 1, N (+ M), D]
    q = query.reshape(R, 1, G, D).to(store.dtype)  # the G query heads of a row as its query rows
    mask = valid[:, None, None, :]  # [R, 1, 1, N], broadcast over the G rows
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [R, 1, G, D]
    return out.to(query.dtype).view(B, 1, Hq, D)


def _decode_device(store: RaggedKVStore, query: torch.Tensor, scaling: float, plan: DecodePlan) -> torch.Tensor:
    """The GPU path: the Triton kernel with the plan's launch shape where Triton runs (CUDA), else
    the block-wise PyTorch computation (same inputs, no host reads) standing in for it."""
    if not plan.use_kernel:
        return _decode_blocks(store, query, scaling)
    B, Hq, _, D = query.shape
    q = query.reshape(store.num_segments, Hq // store.num_heads, D).to(store.dtype)
    # A registered op (kernels.ops): one dispatcher call per layer, traced whole by torch.compile.
    if plan.backend == "triton" and kernel_ops.ragged_decode_triton is not None:
        out = kernel_ops.ragged_decode_triton(q, store.k, store.v, store.start, store.length, float(scaling),
                                              plan.num_splits, plan.max_len)
    else:
        out = kernels.ragged_decode_attention(
            q, store.k, store.v, store.start, store.length, scaling, num_splits=plan.num_splits, max_len=plan.max_len
        )
    return out.to(query.dtype).view(B, 1, Hq, D)


def _decode_uniform(store: RaggedKVStore, query: torch.Tensor, scaling: float, plan: DecodePlan) -> torch.Tensor:
    """One SDPA call for the whole layer when every segment has the same capacity (FullKV and the
    uniform-budget methods): the flat buffers are then a strided ``[B, H, cap, D]`` tensor, read in
    place; shorter segments are masked."""
    B, Hq, _, D = query.shape
    H, c, n = store.num_heads, plan.cap, plan.length
    k = store.k[: store.num_segments * c].view(B, H, c, D)[:, :, :n]
    v = store.v[: store.num_segments * c].view(B, H, c, D)[:, :, :n]
    # The G query heads of a KV head as G query rows over its keys ([B, H, G, D]): one pass over each
    # KV head's keys, where SDPA's enable_gqa reads them once per query head.
    q = query.reshape(B, H, Hq // H, D).to(store.dtype)
    mask = None
    if plan.masked:
        mask = (torch.arange(n, device=store.device)[None, :] < store.length[:, None]).view(B, H, 1, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [B, H, G, D]
    return out.to(query.dtype).view(B, 1, Hq, D)


def _decode_segments(store: RaggedKVStore, query: torch.Tensor, scaling: float, plan: DecodePlan) -> torch.Tensor:
    B, Hq, _, D = query.shape
    G = Hq // store.num_heads
    # 4-D operands: SDPA's fused CPU kernel; 3-D ones fall back to its math path, which scales
    # every stored key by a multiply per step.
    q = query.reshape(store.num_segments, 1, 1, G, D).to(store.dtype)
    out = torch.empty(store.num_segments, G, D, dtype=store.dtype, device=store.device)
    for s, (lo, n) in enumerate(plan.spans):
        k, v = store.k[lo : lo + n].view(1, 1, n, D), store.v[lo : lo + n].view(1, 1, n, D)
        out[s] = F.scaled_dot_product_attention(q[s], k, v, scale=scaling)[0, 0]
    return out.to(query.dtype).view(B, 1, Hq, D)


def _decode_blocks(store: RaggedKVStore, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """The block-wise stand-in for the kernel, as one registered op (``kernels.ops.block_decode``)."""
    B, Hq, _, D = query.shape
    q = query.reshape(store.num_segments, Hq // store.num_heads, D).to(store.dtype)
    out = kernel_ops.block_decode(q, store.k, store.v, store.length, store.block_owner, store.block_offset,
                                  float(scaling), store.block_size)
    return out.to(query.dtype).view(B, 1, Hq, D)

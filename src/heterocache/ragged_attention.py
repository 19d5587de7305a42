"""Attention of new queries over a ragged per-head KV store.

- ``decode_attention``: one query token per row (the decode step). Its host-side decisions live
  in a ``DecodePlan`` built from the store's host mirrors (never from device values), once per
  step and layout by a ``DecodePlanner``. Strategies (``resolve_strategy``):
  ``"segments"`` (CPU default) runs SDPA on each segment's contiguous slice, or one SDPA over a
  strided ``[B, H, cap, D]`` view when every segment has the same capacity (plan "uniform");
  ``"device"`` (GPU default) runs the split-K Triton kernel of ``heterocache.kernels`` with a
  launch shape taken from the capacities, or, where Triton cannot run, the loop-free
  ``"blocks"`` computation: the flat buffers viewed as ``[num_blocks, block_size, D]`` blocks with
  one owner segment each, two batched matmuls and a segment-wise softmax. Neither reads a device
  value on the host. All are tested against ``heterocache.kernels.ragged_decode_attention_torch``.
- ``extend_attention``: several query tokens on a non-empty store (a second turn appended to a
  cached conversation). Rare, so it pads the stored part to a dense tensor and calls SDPA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import ops as kernel_ops
from .kernels.triton_decode import _num_sms, choose_num_splits
from .store.ragged import RaggedKVStore

#: Environment variable choosing the decode strategy ("auto", "device", "segments", "blocks", "kernel";
#: "kernel" is "device" under its earlier name, "blocks" the device path's PyTorch half alone).
STRATEGY_ENV = "HETEROCACHE_DECODE_STRATEGY"
STRATEGIES = ("auto", "device", "segments", "blocks", "kernel")
#: Strategies whose plan depends on capacities only (lengths are read on the device).
_CAPACITY_KEYED = ("device", "kernel", "blocks")


def resolve_strategy(device: torch.device, strategy: str | None = None) -> str:
    """The decode strategy a store on ``device`` uses: "segments" (CPU: SDPA on contiguous slices,
    fastest there) or "device" (what a GPU runs: the Triton kernel, or where Triton cannot run the
    loop-free block-wise PyTorch stand-in, with launch shapes from capacities).

    Args:
        strategy: one of :data:`STRATEGIES`; None reads ``$HETEROCACHE_DECODE_STRATEGY`` (default
            "auto": "segments" on CPU, "device" elsewhere). ``device`` on CPU tensors takes exactly
            the CUDA path, with PyTorch standing in for the kernel (how CI covers it).

    Raises:
        ValueError: unknown strategy.
    """
    name = (strategy if strategy is not None else os.environ.get(STRATEGY_ENV, "auto")).strip().lower() or "auto"
    if name not in STRATEGIES:
        source = "strategy" if strategy is not None else f"${STRATEGY_ENV}"
        raise ValueError(f"{source} must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        return "segments" if torch.device(device).type == "cpu" else "device"
    return name


@dataclass(frozen=True)
class DecodePlan:
    """Everything the host decides about one layer's decode attention, from host values only.

    Built once per decode step for each distinct layout (``DecodePlanner``) and reused by every
    layer that has it (FlashInfer's plan/run split).

    Attributes:
        strategy: "uniform" (one SDPA over a strided ``[B, H, cap, D]`` view), "segments" (one SDPA
            per segment), "device" (kernel or block-wise stand-in), "blocks", "kernel".
        cap, length, masked: "uniform" only: the shared capacity, the longest segment, whether
            shorter segments must be masked.
        spans: "segments" only: ``(first_slot, tokens)`` per segment.
        max_len, num_splits: "device"/"kernel": launch shape from the capacities (fixed until the
            store reallocates, so a captured graph can replay it).
        backend: "device"/"kernel": the kernel backend (``kernels.resolve_backend``), resolved
            when the plan is built, not per layer; ``use_kernel`` is whether it is not "torch".
    """

    strategy: str
    cap: int = 0
    length: int = 0
    masked: bool = False
    spans: tuple = ()
    max_len: int = 0
    num_splits: int = 1
    backend: str = "torch"

    @property
    def use_kernel(self) -> bool:
        return self.backend != "torch"


def plan_decode(store: RaggedKVStore, strategy: str) -> DecodePlan:
    """The decode plan of a store for a strategy (see ``resolve_strategy``), from host mirrors."""
    if strategy in ("device", "kernel"):
        caps = store.cap_h
        max_cap = int(caps.max()) if caps.size else 0
        splits = choose_num_splits(max_cap, int(caps.sum()), _num_sms(store.device))
        backend = kernels.resolve_backend(store.device)
        return DecodePlan(strategy, max_len=max_cap, num_splits=splits, backend=backend)
    if strategy == "blocks":
        return DecodePlan("blocks")
    if strategy != "segments":
        raise ValueError(f"unknown strategy {strategy!r}")
    caps, lengths = store.cap_h, store.length_h
    if caps.size and (caps == caps[0]).all():
        n = int(lengths.max())
        return DecodePlan("uniform", cap=int(caps[0]), length=n, masked=bool((lengths != n).any()))
    return DecodePlan("segments", spans=tuple(zip(store.start_h.tolist(), lengths.tolist())))


def plan_key(store: RaggedKVStore, strategy: str) -> tuple:
    """What a plan depends on: the capacity layout (device strategies read lengths on the device)
    and, for the CPU strategies, the lengths too."""
    # The device too: under device_map layers of one layout live on different devices, whose plans
    # may differ (SM count, kernel backend).
    key = (strategy, str(store.device), store.num_rows, store.num_heads, store.cap_h.tobytes())
    return key if strategy in _CAPACITY_KEYED else key + (store.length_h.tobytes(),)


class DecodePlanner:
    """Per-cache memo of decode plans: one build per decode step and layout, reused by every
    layer with that layout. ``built`` / ``reused`` count what happened (tests, benchmarks)."""

    def __init__(self):
        self._plans: dict[tuple, DecodePlan] = {}
        self._strategies: dict[str, str] = {}  # device type -> strategy, resolved once per step
        self._backends: dict[str, str] = {}  # device type -> kernel backend, resolved once per step
        self._step = None
        self.built = 0
        self.reused = 0

    def _at_step(self, step) -> None:
        if step != self._step:
            # Length-keyed (CPU) plans are only valid for one step; capacity-keyed ones stay.
            self._plans = {k: p for k, p in self._plans.items() if k[0] in _CAPACITY_KEYED}
            if len(self._plans) > 256:
                self._plans.clear()
            self._strategies.clear()
            self._backends.clear()
            self._step = step

    def plan(self, store: RaggedKVStore, step, strategy: str | None = None) -> DecodePlan:
        """The plan of ``store`` at decode step ``step`` (any hashable that changes per step)."""
        self._at_step(step)
        if strategy is None:
            strategy = self._strategies.get(store.device.type)
            if strategy is None:
                strategy = self._strategies[store.device.type] = resolve_strategy(store.device)
        else:
            strategy = resolve_strategy(store.device, strategy)
        key = plan_key(store, strategy)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_decode(store, strategy)
            self.built += 1
        else:
            self.reused += 1
        return plan

    def backend(self, device: torch.device, step) -> str:
        """The kernel backend on ``device`` (``kernels.resolve_backend``) at decode step ``step``,
        resolved once per step and device type, for the per-step selection path."""
        self._at_step(step)
        name = self._backends.get(device.type)
        if name is None:
            name = self._backends[device.type] = kernels.resolve_backend(device)
        return name


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
    # KV head's keys, where SDPA's enable_gqa reads them once per query head (2x slower on CPU).
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


def extend_attention(
    store: RaggedKVStore,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    new_valid: torch.Tensor | None,
    scaling: float,
    window: int | None = None,
    positions: torch.Tensor | None = None,
    extra: tuple | None = None,
) -> torch.Tensor:
    """Attention of q new tokens over the stored tokens plus themselves (causal).

    Args:
        store: the layer's store (tokens already cached, all in the past of the new ones).
        query: ``[B, Hq, q, D]``.
        key, value: ``[B, H, q, D]`` of the new tokens (not yet in the store).
        new_valid: optional bool ``[B, q]``: False for padding among the new tokens.
        scaling: softmax scale.
        window: a sliding layer's ``W``: query at position ``p`` sees positions ``> p - W`` only.
        positions: int ``[q]`` logical positions of the new tokens (needed with ``window``).
        extra: optional past tokens kept outside the store (``Policy.extend_extra``): ``(key
            [S, M, D], value [S, M, D], valid bool [S, M])``, visible to every new token (full
            layers only).

    Returns:
        ``[B, q, Hq, D]``.
    """
    B, Hq, q_len, D = query.shape
    H = store.num_heads
    G = Hq // H
    k_old, v_old, valid_old, pos_old = store.padded()
    if extra is not None:
        if window is not None:
            raise ValueError("extra past tokens are for full-attention layers only")
        ek, ev, evalid = extra
        M = ek.shape[1]
        k_old = torch.cat([k_old, ek.reshape(B, H, M, D).to(k_old.dtype)], dim=2)
        v_old = torch.cat([v_old, ev.reshape(B, H, M, D).to(v_old.dtype)], dim=2)
        valid_old = torch.cat([valid_old, evalid.reshape(B, H, M)], dim=2)
    k_all = torch.cat([k_old.to(key.dtype), key], dim=2)
    v_all = torch.cat([v_old.to(value.dtype), value], dim=2)
    ar = torch.arange(q_len, device=query.device)
    causal = ar[None, :] <= ar[:, None]
    old_mask = valid_old[:, :, None, :].expand(-1, -1, q_len, -1)
    if window is not None:
        causal = causal & (ar[None, :] > ar[:, None] - window)
        qpos = positions.to(pos_old.device).long()
        old_mask = old_mask & (pos_old[:, :, None, :] > qpos[None, None, :, None] - window)
    new_mask = causal[None, None].expand(B, H, q_len, q_len)
    if new_valid is not None:
        new_mask = new_mask & new_valid[:, None, None, :]
    mask = torch.cat([old_mask, new_mask], dim=-1)
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

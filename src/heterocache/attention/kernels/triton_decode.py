"""Split-K flash-decoding over the ragged per-head KV store, in Triton.

Same contract as :func:`heterocache.attention.kernels.ragged_decode.ragged_decode_attention_torch`.

Design:

- Stage 1, grid ``(S, num_splits)``: program ``(s, j)`` reads tokens
  ``[j * chunk, min((j + 1) * chunk, seg_len[s]))`` of segment ``s`` in tiles of ``BLOCK_N`` and
  runs an online softmax for all ``G`` query heads at once, so each ``[BLOCK_N, D]`` K/V tile is
  loaded once per GQA group. ``chunk`` is one value for the whole launch (derived from the longest
  segment), so a short segment simply has fewer non-empty splits; empty programs store nothing.
  Scores use ``tl.dot`` with ``G`` padded to at least 16 rows (the tensor-core minimum) when
  ``G > 1``, and a broadcast-multiply-reduce (a GEMV) when ``G == 1``.
  Each non-empty split writes its normalised partial output and its log-sum-exp (base 2).
- Stage 2, grid ``(S, G)``: merges the ``cdiv(seg_len, chunk)`` valid splits of each row.
  With a single split, stage 1 writes the final output directly and stage 2 is skipped.

Scores are kept in the log2 domain (``exp2`` is the native instruction); the returned
log-sum-exp is converted back to natural log. Everything accumulates in fp32; fp32 inputs use
IEEE (not TF32) dot products.

``triton`` is optional: without it this module still imports and the entry point raises.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .ragged_decode import check_decode_inputs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "choose_num_splits", "ragged_decode_attention_triton", "table_decode_attention_triton"]

_LOG2E = 1.4426950408889634

# A split must cover at least this many tokens: below that, writing and merging a partial
# result costs more than the parallelism gains.
MIN_TOKENS_PER_SPLIT = 256
# Upper bound on splits per segment (grid axis 1 is limited to 65535; the merge loops over them).
MAX_SPLITS = 4096
# Programs per SM the split heuristic aims for.
PROGRAMS_PER_SM = 4


def _launcher(kernel):
    """``kernel`` as ``torch.compile`` can trace it inside a ``triton_op`` (``wrap_triton``; eager
    calls launch it as usual); the interpreter's kernels (``TRITON_INTERPRET=1``) as they are."""
    from triton.runtime.jit import JITFunction

    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter / CPU: few programs, the heuristic then mostly picks 1 split
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(max_len: int, total_len: int, num_sms: int, block_n: int = 64) -> int:
    """Number of splits per segment for one launch.

    The chunk a split covers is ``total_len / (PROGRAMS_PER_SM * num_sms)`` tokens (at least
    ``MIN_TOKENS_PER_SPLIT``), so the non-empty programs number about ``PROGRAMS_PER_SM * num_sms
    + S`` whatever the mix of lengths: a lone 1M-token segment is spread over hundreds of
    programs, a batch of short segments gets one split each.

    Args:
        max_len: longest segment (tokens).
        total_len: sum of all segment lengths.
        num_sms: streaming multiprocessors of the device.
        block_n: kernel tile length; chunks are whole tiles.

    Returns:
        splits >= 1.
    """
    if max_len <= 0:
        return 1
    target = PROGRAMS_PER_SM * max(1, num_sms)
    chunk = max(MIN_TOKENS_PER_SPLIT, -(-max(total_len, max_len) // target))
    chunk = -(-chunk // block_n) * block_n
    return int(min(MAX_SPLITS, -(-max_len // chunk)))


if HAS_TRITON:

    @triton.jit
    def _split_kernel(
        Q, K, V, SegStart, SegLen,
        Table, TValid,  # HAS_TABLE: token t of segment s lives at slot Table[s, t], used if TValid[s, t]
        Out, Lse,  # stage-1 output: final [S, G, D] / [S, G] when SINGLE, else workspaces
        stride_qs, stride_qg, stride_qd,
        stride_kt, stride_kd,
        stride_vt, stride_vd,
        stride_ts, stride_vs,
        stride_os, stride_og, stride_oj, stride_od,
        stride_ls, stride_lg, stride_lj,
        G, D, chunk, qk_scale,
        G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr, SINGLE: tl.constexpr,
        HAS_TABLE: tl.constexpr,
    ):
        s = tl.program_id(0)
        j = tl.program_id(1)
        seg_len = tl.load(SegLen + s).to(tl.int32)
        seg_start = tl.load(SegStart + s).to(tl.int64)
        lo = j * chunk
        hi = tl.minimum(lo + chunk, seg_len)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        mask_g = offs_g < G
        mask_d = offs_d < D
        q = tl.load(
            Q + s.to(tl.int64) * stride_qs + offs_g[:, None] * stride_qg + offs_d[None, :] * stride_qd,
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        )
        if not USE_DOT or DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        # Runs zero times for an empty split (lo >= seg_len); every tile it does run holds at
        # least one valid token, so m_new is finite and no -inf - -inf arises.
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            mask_n = pos < hi
            if HAS_TABLE:
                row = s.to(tl.int64)
                slot = tl.load(Table + row * stride_ts + pos, mask=mask_n, other=0).to(tl.int64)
                mask_n = mask_n & (tl.load(TValid + row * stride_vs + pos, mask=mask_n, other=0) != 0)
            else:
                slot = seg_start + pos  # int64: T * D can exceed 2**31
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + slot[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            if USE_DOT:
                if DOT_FP32:
                    k = k.to(tl.float32)
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            else:
                qk = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [G_PAD, BLOCK_N], log2 units
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            # A tile (or a table's run of unused entries) with nothing valid so far leaves m at
            # -inf: shift by 0 there so exp2 gives 0, not exp2(-inf + inf) = NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(qk - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + slot[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if USE_DOT:
                if DOT_FP32:
                    v = v.to(tl.float32)
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        # Single split: always store (an empty segment gets zeros / -inf). Several splits: only
        # non-empty ones store; the merge reads exactly those.
        o_mask = mask_g[:, None] & mask_d[None, :]
        l_mask = mask_g
        if SINGLE:
            lse2 = lse2 * 0.6931471805599453  # the final lse is a natural log
        else:
            # A vector, not a scalar condition: the interpreter rejects scalar-broadcast masks.
            split_used = (tl.zeros([G_PAD], tl.int32) + lo) < seg_len
            o_mask = o_mask & split_used[:, None]
            l_mask = l_mask & split_used
        o_ptr = (Out + s.to(tl.int64) * stride_os + j * stride_oj + offs_g[:, None] * stride_og
                 + offs_d[None, :] * stride_od)
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=o_mask)
        tl.store(Lse + s.to(tl.int64) * stride_ls + j * stride_lj + offs_g * stride_lg, lse2, mask=l_mask)

    @triton.jit
    def _merge_kernel(
        PartO, PartLse, SegLen, Out, Lse,
        stride_ps, stride_pg, stride_pj, stride_pd,
        stride_ls, stride_lg, stride_lj,
        stride_os, stride_og, stride_od,
        stride_fs, stride_fg,
        D, chunk,
        D_PAD: tl.constexpr, BLOCK_SP: tl.constexpr,
    ):
        s = tl.program_id(0)
        g = tl.program_id(1)
        seg_len = tl.load(SegLen + s).to(tl.int32)
        n_valid = tl.cdiv(seg_len, chunk)  # splits stage 1 wrote for this segment
        offs_j = tl.arange(0, BLOCK_SP)
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < D
        lse_base = PartLse + s.to(tl.int64) * stride_ls + g * stride_lg
        o_base = PartO + s.to(tl.int64) * stride_ps + g * stride_pg

        # Pass 1: the largest split lse (vector-carried, reduced once).
        m_vec = tl.full([BLOCK_SP], float("-inf"), tl.float32)
        for j0 in range(0, n_valid, BLOCK_SP):
            jj = j0 + offs_j
            lse = tl.load(lse_base + jj * stride_lj, mask=jj < n_valid, other=float("-inf"))
            m_vec = tl.maximum(m_vec, lse)
        # Every split empty (a table that selected nothing): shift by 0, not -inf, so weights are 0.
        m = tl.max(m_vec, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        # Pass 2: weighted sum of the partial outputs (masked splits weigh exp2(-inf) = 0).
        l_vec = tl.zeros([BLOCK_SP], tl.float32)
        acc = tl.zeros([BLOCK_SP, D_PAD], tl.float32)
        for j0 in range(0, n_valid, BLOCK_SP):
            jj = j0 + offs_j
            mj = jj < n_valid
            lse = tl.load(lse_base + jj * stride_lj, mask=mj, other=float("-inf"))
            w = tl.exp2(lse - m)
            o = tl.load(o_base + jj[:, None] * stride_pj + offs_d[None, :] * stride_pd,
                        mask=mj[:, None] & mask_d[None, :], other=0.0)
            l_vec += w
            acc += w[:, None] * o
        l = tl.sum(l_vec, axis=0)
        nonempty = l > 0.0  # no split stored, or (table) every split attended nothing
        out = tl.sum(acc, axis=0) / tl.where(nonempty, l, 1.0)
        lse_out = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, l, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(Out + s.to(tl.int64) * stride_os + g * stride_og + offs_d * stride_od, out.to(Out.dtype.element_ty),
                 mask=mask_d)
        tl.store(Lse + s.to(tl.int64) * stride_fs + g * stride_fg, lse_out)


def ragged_decode_attention_triton(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    scale: float,
    *,
    return_lse: bool = False,
    num_splits: int | None = None,
    max_len: int | None = None,
    block_n: int | None = None,
    use_dot: bool | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    slot_table: torch.Tensor | None = None,
    table_valid: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Split-K flash-decoding of each segment's ``G`` query heads over its own KV slots.

    With ``slot_table`` (int64 ``[S, N]``) and ``table_valid`` (bool ``[S, N]``), segment ``s``
    attends to the slots ``slot_table[s, t]`` where ``table_valid[s, t]`` instead of a contiguous
    range (a per-step selection such as Quest's pages: a page table); ``seg_start`` is then
    ignored and ``seg_len`` must be ``N`` for every segment.

    Args:
        q: ``[S, G, D]`` queries, fp16/bf16/fp32 (any strides).
        k_buf, v_buf: ``[T, D]`` packed keys / values (any strides; same dtype).
        seg_start: int64 ``[S]`` first slot of each segment.
        seg_len: int32/int64 ``[S]`` used slots of each segment (0 allowed: zeros, lse -inf).
        scale: softmax scale.
        return_lse: also return the natural-log log-sum-exp ``[S, G]`` fp32.
        num_splits: splits per segment; default from :func:`choose_num_splits`.
        max_len: ``seg_len.max()`` if the caller knows it. Passing both ``num_splits`` and
            ``max_len`` makes the call free of host syncs (CUDA-graph friendly); otherwise one
            sync reads max and sum of ``seg_len``. A ``max_len`` below the real maximum drops
            tokens; above it is only slower.
        block_n: tokens per tile, a power of two >= 16 (default 64, 32 when ``D > 128``).
        use_dot: tensor-core ``tl.dot`` for the scores (default: ``G > 1``).
        num_warps, num_stages: launch parameters of stage 1 (default 4 / compiler default).

    Returns:
        ``out`` ``[S, G, D]`` in ``q.dtype``, or ``(out, lse)`` when ``return_lse``.

    Segment ranges are not bounds-checked (that would cost a sync): the caller guarantees
    ``seg_start[s] + seg_len[s] <= T``. Workspace: ``S * G * num_splits * (D + 1)`` fp32 when
    ``num_splits > 1``.

    Raises:
        ImportError: triton is not installed. ValueError: bad ``block_n`` or inputs.
        RuntimeError: CPU tensors without the interpreter.
    """
    if not HAS_TRITON:
        raise ImportError("ragged_decode_attention_triton needs triton (pip install triton)")
    S, G, D = check_decode_inputs(q, k_buf, v_buf, seg_start, seg_len)
    dev = q.device
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
    if S == 0 or G == 0 or k_buf.shape[0] == 0:
        # Nothing to launch; an empty buffer also means every segment is empty (and its data
        # pointer may be null, which the launcher rejects).
        out = torch.zeros(S, G, D, dtype=q.dtype, device=dev)
        lse = torch.full((S, G), float("-inf"), device=dev)
        return (out, lse) if return_lse else out
    out = torch.empty(S, G, D, dtype=q.dtype, device=dev)
    lse = torch.empty(S, G, dtype=torch.float32, device=dev)

    D_PAD = max(16, _next_pow2(D))
    if block_n is None:
        block_n = 64 if D_PAD <= 128 else 32
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if use_dot is None:
        use_dot = G > 1
    G_PAD = max(16, _next_pow2(G)) if use_dot else _next_pow2(G)
    if num_splits is None or max_len is None:
        mx, tot = (int(x) for x in torch.stack([seg_len.max(), seg_len.sum()]).tolist())
        max_len = mx if max_len is None else max_len
        if num_splits is None:
            num_splits = choose_num_splits(max_len, tot, _num_sms(dev), block_n)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    # Whole tiles per chunk, and no more splits than chunks of the longest segment.
    longest = max(int(max_len), 1)
    chunk = -(-(-(-longest // num_splits)) // block_n) * block_n  # noqa: B002  (nested ceil divisions, not --)
    num_splits = -(-longest // chunk)
    single = num_splits == 1

    # fp32 caches get exact products (TF32 would cost ~1e-3 relative error); for fp16/bf16
    # operands the setting is moot.
    dot_prec = "ieee" if k_buf.dtype == torch.float32 else "tf32"
    # The interpreter (the only way CPU tensors get here) multiplies bf16 dot operands as raw
    # uint16 bit patterns (triton 3.9); upcast there. GPU code never takes this branch.
    dot_fp32 = dev.type != "cuda" and k_buf.dtype == torch.bfloat16
    if dot_fp32:
        dot_prec = "ieee"
    if use_dot and q.dtype != k_buf.dtype:
        q = q.to(k_buf.dtype)  # tl.dot wants matching operand types
    qk_scale = float(scale) * _LOG2E

    if single:
        part_o, part_lse = out, lse
        po_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        pl_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        part_o = torch.empty(S, G, num_splits, D, dtype=torch.float32, device=dev)
        part_lse = torch.empty(S, G, num_splits, dtype=torch.float32, device=dev)
        po_strides = (part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3))
        pl_strides = (part_lse.stride(0), part_lse.stride(1), part_lse.stride(2))

    extra = {} if num_stages is None else {"num_stages": num_stages}
    has_table = slot_table is not None
    table = slot_table if has_table else seg_start  # any tensor: unused without HAS_TABLE
    tvalid = table_valid.view(torch.uint8) if has_table else seg_start
    # Triton launches on the current device: under device_map a layer's tensors may live on another.
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        _launcher(_split_kernel)[(S, num_splits)](
            q, k_buf, v_buf, seg_start, seg_len,
            table, tvalid,
            part_o, part_lse,
            q.stride(0), q.stride(1), q.stride(2),
            k_buf.stride(0), k_buf.stride(1),
            v_buf.stride(0), v_buf.stride(1),
            table.stride(0), tvalid.stride(0),
            *po_strides, *pl_strides,
            G, D, chunk, qk_scale,
            G_PAD=G_PAD, D_PAD=D_PAD, BLOCK_N=block_n,
            USE_DOT=bool(use_dot), DOT_PREC=dot_prec, DOT_FP32=dot_fp32, SINGLE=single,
            HAS_TABLE=has_table,
            num_warps=num_warps, **extra,
        )
        if not single:
            _launcher(_merge_kernel)[(S, G)](
                part_o, part_lse, seg_len, out, lse,
                *po_strides, *pl_strides,
                out.stride(0), out.stride(1), out.stride(2),
                lse.stride(0), lse.stride(1),
                D, chunk,
                D_PAD=D_PAD, BLOCK_SP=min(32, _next_pow2(num_splits)),
                num_warps=4,
            )
    return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=64)
def _table_ranges(S: int, N: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The constant ``seg_start`` (zeros) and ``seg_len`` (N) of a table launch, made once per
    shape and device instead of twice per layer and step (the kernel only reads them)."""
    return (torch.zeros(S, dtype=torch.int64, device=device),
            torch.full((S,), N, dtype=torch.int64, device=device))


def table_decode_attention_triton(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slot_table: torch.Tensor,
    table_valid: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of each segment's ``G`` query heads over the slots a table names.

    Args:
        q: ``[S, G, D]``; k_buf, v_buf: ``[T, D]``.
        slot_table: int64 ``[S, N]`` slot of each segment's t-th selected token (any order).
        table_valid: bool ``[S, N]``: which entries are used (a segment with none gets zeros).
        num_splits: splits of the N entries (default from ``choose_num_splits``; launch shape from
            ``N`` alone, a host value, so no sync).
        **kwargs: as ``ragged_decode_attention_triton`` (``return_lse``, ``block_n``, ...).

    Raises:
        ValueError: a table of another shape, dtype or device.
    """
    S = q.shape[0]
    if slot_table.dim() != 2 or slot_table.shape[0] != S or table_valid.shape != slot_table.shape:
        raise ValueError(f"slot_table and table_valid must both be [{S}, N], got "
                         f"{tuple(slot_table.shape)} and {tuple(table_valid.shape)}")
    if slot_table.dtype != torch.int64 or table_valid.dtype != torch.bool:
        raise ValueError(f"slot_table must be int64 and table_valid bool, got {slot_table.dtype}, {table_valid.dtype}")
    if slot_table.device != q.device or table_valid.device != q.device:
        raise ValueError(
            f"slot_table and table_valid must be on {q.device}, got {slot_table.device}, {table_valid.device}"
        )
    for name in ("max_len", "slot_table", "table_valid", "seg_start", "seg_len"):
        if name in kwargs:
            raise TypeError(f"table_decode_attention_triton sets {name} itself")
    N = slot_table.shape[1]
    dev = q.device
    seg_start, seg_len = _table_ranges(S, N, dev)
    if num_splits is None:
        num_splits = choose_num_splits(N, S * N, _num_sms(dev))
    return ragged_decode_attention_triton(
        q, k_buf, v_buf, seg_start, seg_len, scale, num_splits=num_splits, max_len=N,
        slot_table=slot_table.contiguous(), table_valid=table_valid.contiguous(), **kwargs,
    )

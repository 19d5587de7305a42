"""Random ragged decode-attention inputs, for the kernel tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["make_ragged_case"]


def make_ragged_case(
    lengths: Sequence[int] | torch.Tensor,
    num_groups: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    garbage: float = float("nan"),
    max_gap: int = 7,
    shuffle: bool = True,
    seed: int = 0,
    seg_len_dtype: torch.dtype = torch.int64,
) -> dict[str, torch.Tensor]:
    """Packed K/V buffers with one segment per entry of ``lengths``, in the store's layout.

    Segments are laid out in a random order (``shuffle``) with random unused gaps of up to
    ``max_gap`` slots before each one and after the last; every unused slot holds ``garbage``.

    Args:
        lengths: tokens of each of the ``S`` segments (0 allowed).
        num_groups: ``G`` query heads per segment.
        head_dim: ``D``.
        dtype, device: of ``q``, ``k_buf`` and ``v_buf``.
        garbage: value of the unused slots (NaN by default: any read of one shows).
        max_gap: largest gap between segments (default 7).
        shuffle: place the segments in a random order, not in index order.
        seed: of the generator.
        seg_len_dtype: int64 (default) or int32.

    Returns:
        dict with ``q`` ``[S, G, D]`` (standard normal), ``k_buf``/``v_buf`` ``[T, D]``,
        ``seg_start`` int64 ``[S]``, ``seg_len`` ``[S]``.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    lens = torch.as_tensor(lengths, dtype=torch.long).cpu()
    S = lens.numel()
    order = torch.randperm(S, generator=gen) if shuffle else torch.arange(S)
    if max_gap > 0:
        gaps = torch.randint(0, max_gap + 1, (S + 1,), generator=gen)
    else:
        gaps = torch.zeros(S + 1, dtype=torch.long)
    sizes = gaps[:S] + lens[order]
    ends = torch.cumsum(sizes, 0)
    seg_start = torch.empty(S, dtype=torch.long)
    seg_start[order] = ends - lens[order]
    T = (int(ends[-1]) if S else 0) + int(gaps[S])

    k_buf = torch.full((T, head_dim), garbage, dtype=dtype, device=device)
    v_buf = torch.full((T, head_dim), garbage, dtype=dtype, device=device)
    n = int(lens.sum())
    if n:
        owner = torch.repeat_interleave(torch.arange(S), lens)
        first = torch.cumsum(lens, 0) - lens
        slots = (seg_start[owner] + torch.arange(n) - first[owner]).to(device)
        dgen = torch.Generator(device=device).manual_seed(seed + 1)
        k_buf[slots] = torch.randn(n, head_dim, generator=dgen, device=device).to(dtype)
        v_buf[slots] = torch.randn(n, head_dim, generator=dgen, device=device).to(dtype)
    q = torch.randn(S, num_groups, head_dim, generator=gen).to(device=device, dtype=dtype)
    return {
        "q": q,
        "k_buf": k_buf,
        "v_buf": v_buf,
        "seg_start": seg_start.to(device),
        "seg_len": lens.to(device=device, dtype=seg_len_dtype),
    }

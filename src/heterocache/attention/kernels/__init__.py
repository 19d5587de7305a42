"""Attention kernels over the ragged per-head KV store.

Backends of one contract (see :mod:`heterocache.attention.kernels.ragged_decode` for the layout):

- ``torch``: :func:`ragged_decode_attention_torch`, plain PyTorch, CPU or GPU; the test oracle.
- ``triton``: :func:`heterocache.attention.kernels.triton_decode.ragged_decode_attention_triton`,
  split-K flash-decoding (needs triton and CUDA tensors, or ``TRITON_INTERPRET=1``).
- ``flash``: :func:`heterocache.attention.kernels.flash_decode.ragged_decode_attention_flash` (needs
  flash-attn; only when asked for).

``triton`` and ``flash_attn`` are optional: importing this package imports neither.
"""

from __future__ import annotations

import importlib.util

import torch

from .ragged_decode import ragged_decode_attention_torch
from .settings import ENV_VAR, decode_setting

__all__ = [
    "BACKENDS",
    "ragged_decode_attention",
    "ragged_decode_attention_torch",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "torch", "triton", "flash")


def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a call on ``device`` would use: ``"torch"``, ``"triton"`` or ``"flash"``.

    Args:
        device: device of the tensors.
        backend: one of :data:`BACKENDS`; ``None`` reads ``backend=`` of ``$HETEROCACHE_DECODE``
            (default ``"auto"``; :mod:`.settings`). ``"auto"`` = triton on CUDA when triton is importable, else torch.

    Raises:
        ValueError: unknown backend name.
    """
    name = (backend if backend is not None else decode_setting("backend")).strip().lower() or "auto"
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"backend= of ${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    return name


def ragged_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    scale: float,
    *,
    return_lse: bool = False,
    backend: str | None = None,
    num_splits: int | None = None,
    max_len: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the ragged store with the best available backend.

    Args:
        q: ``[S, G, D]`` (``S = batch * num_kv_heads``, ``G`` query heads per KV head).
        k_buf, v_buf: ``[T, D]`` packed keys / values.
        seg_start: int64 ``[S]``; seg_len: int32/int64 ``[S]`` (0 allowed).
        scale: softmax scale.
        return_lse: also return the log-sum-exp ``[S, G]`` fp32 (``-inf`` for empty segments).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"flash"``; ``None`` reads
            ``backend=`` of ``$HETEROCACHE_DECODE`` (default ``"auto"``).
        num_splits, max_len: Triton only (see ``ragged_decode_attention_triton``); ignored by
            the other backends.

    Returns:
        ``out`` ``[S, G, D]`` in ``q.dtype``, or ``(out, lse)``.

    Raises:
        ValueError: unknown backend. ImportError: a forced backend is not installed.
        RuntimeError: ``"triton"`` forced on CPU tensors without ``TRITON_INTERPRET=1``.
    """
    name = resolve_backend(q.device, backend)
    if name == "triton":
        from .triton_decode import ragged_decode_attention_triton

        return ragged_decode_attention_triton(
            q, k_buf, v_buf, seg_start, seg_len, scale,
            return_lse=return_lse, num_splits=num_splits, max_len=max_len,
        )
    if name == "flash":
        from .flash_decode import ragged_decode_attention_flash

        return ragged_decode_attention_flash(q, k_buf, v_buf, seg_start, seg_len, scale, return_lse=return_lse)
    return ragged_decode_attention_torch(q, k_buf, v_buf, seg_start, seg_len, scale, return_lse=return_lse)

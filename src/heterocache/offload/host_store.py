"""Full prompt KV of a layer's host-copied heads in host memory (pinned when the model is on CUDA):
the satellites, and the anchors (with ``turn_reselect="own"``, the default) and pivots
(``pivot_offload``) when they keep one.

Only those heads are copied, never whole layers. Row ``b``'s copy holds its real prompt
tokens in order, so index ``j`` is the ``j``-th real token: the same index as the ``j``-th prompt
slot of a pivot's (full) segment.

Why not :class:`heterocache.offload.host_rows.HostRows` (ShadowKV, OmniKV): those gather by indices that
live on the device, through a device kernel reading pinned memory. A satellite refresh is decided
on the host (its drift decision arrives ``DECISION_LAG`` steps later), so its indices are host values and
the gather runs on the host into fresh pinned staging, the source of one asynchronous
host-to-device copy per refresh (``transfer.RefreshTransfer``) that a side stream overlaps with
decoding; a UVA read would instead make the decode stream's kernel wait on the host link.
"""

from __future__ import annotations

import numpy as np
import torch


class SatelliteHostStore:
    """Host copies of the host-copied heads (satellites first) of one layer.

    Args:
        key, value: ``[B, H, L, D]`` prompt keys/values of the layer (any device).
        valid: bool ``[B, L]`` real tokens.
        heads: KV-head indices of the layer's satellites.
        pin: allocate page-locked memory (for asynchronous host-to-device copies).

    Attributes:
        k, v: ``[B, len(heads), Lmax, D]`` on the CPU (Lmax = longest real prompt of the batch).
        lengths: int64 ``[B]`` real tokens per row.
    """

    def __init__(self, key, value, valid, heads: list[int], pin: bool):
        B, _, L, D = key.shape
        self.heads = list(heads)
        self.slot = {h: i for i, h in enumerate(self.heads)}
        # head -> its index here, as an array: batched look-ups without a loop (-1: not held)
        self._slot_of = np.full(max(self.heads, default=-1) + 1, -1, np.int64)
        self._slot_of[np.asarray(self.heads, np.int64)] = np.arange(len(self.heads))
        self.lengths = valid.sum(-1).cpu()
        Lmax = int(self.lengths.max()) if B else 0
        shape = (B, len(self.heads), Lmax, D)
        self.k = torch.zeros(shape, dtype=key.dtype, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=value.dtype, pin_memory=pin)
        idx = torch.tensor(self.heads, dtype=torch.long, device=key.device)
        for b in range(B):
            n = int(self.lengths[b])
            rows = valid[b]
            self.k[b, :, :n] = key[b].index_select(0, idx)[:, rows].cpu()
            self.v[b, :, :n] = value[b].index_select(0, idx)[:, rows].cpu()

    def gather(self, row: int, head: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, D]`` of prompt tokens ``indices`` (int64, CPU) of one satellite.

        The result lives in fresh (pinned, if the store is) memory that nobody else writes: it can
        be the source of an asynchronous copy.
        """
        s = self.slot[head]
        pin = self.k.is_pinned()
        n, D = len(indices), self.k.shape[-1]
        k = torch.empty(n, D, dtype=self.k.dtype, pin_memory=pin)
        v = torch.empty(n, D, dtype=self.v.dtype, pin_memory=pin)
        torch.index_select(self.k[row, s], 0, indices, out=k)
        torch.index_select(self.v[row, s], 0, indices, out=v)
        return k, v

    def gather_batch(self, rows: np.ndarray, heads: np.ndarray, indices: np.ndarray, counts: np.ndarray):
        """One gather for many satellites: prompt tokens ``indices`` (concatenated, ``counts[i]`` of
        them for satellite ``(rows[i], heads[i])``), as ``k, v [sum(counts), D]`` in fresh (pinned,
        if the store is) memory that can be the source of an asynchronous copy."""
        B, nsat, Lmax, D = self.k.shape
        slots = self._slot_of[np.asarray(heads, np.int64)]
        base = np.repeat((np.asarray(rows, np.int64) * nsat + slots) * Lmax, counts)
        flat = torch.from_numpy(base + np.asarray(indices, np.int64))
        pin = self.k.is_pinned()
        k = torch.empty(len(flat), D, dtype=self.k.dtype, pin_memory=pin)
        v = torch.empty(len(flat), D, dtype=self.v.dtype, pin_memory=pin)
        torch.index_select(self.k.view(-1, D), 0, flat, out=k)
        torch.index_select(self.v.view(-1, D), 0, flat, out=v)
        return k, v

    def select_rows(self, rows: torch.Tensor) -> None:
        rows = rows.cpu()
        pin = self.k.is_pinned()
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)
        if pin:
            self.k, self.v = self.k.pin_memory(), self.v.pin_memory()
        self.lengths = self.lengths.index_select(0, rows)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

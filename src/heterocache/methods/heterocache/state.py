"""Per-layer runtime state of the HeteroCache policy, and its statistics.

Host values are NumPy arrays (read by the host without touching the device), device values
tensors on the layer's device, built once per prefill or row change so that a decode step copies
no index to the device.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ...offload.host_kv import HostKV
from ...store.ragged import RaggedKVStore, to_device
from .clusters import ClusterLayout, LayoutIndex


@dataclass
class RefreshStats:
    """What the refresh mechanism did (see ``HeteroCache.stats``)."""

    checks: int = 0
    refreshes: Counter = field(default_factory=Counter)  # (layer, pivot) -> drift events
    satellite_refills: int = 0
    tokens_moved: int = 0
    bytes_moved: int = 0
    late_decisions: int = 0  # deferred decisions whose copy had not landed when due (host waited)
    reselected_heads: int = 0  # (row, head) prompt-slot re-selections at new turns (turn_reselect="own")


class TurnHeads:
    """The heads of a layer that a new turn re-chooses from their own queries
    (``turn_reselect="own"``): compressed heads with a host copy, planned below the prompt.

    Attributes:
        heads: store indices of the heads re-chosen in some row; ``heads_dev`` the same on the device.
        marks: bool ``[B, H]`` (host): which (row, head) a turn re-chooses.
        counts_dev: int64 ``[B, Nr]`` (device): prompt slots of each re-chosen (row, head), 0 where
            not re-chosen; ``nmax`` their maximum (host).
        prompt_dev: int64 ``[B]`` (device): real prompt tokens of each row.
    """

    def __init__(self, heads: list[int], marks: np.ndarray, device: torch.device):
        self.heads, self.marks = heads, marks
        self.heads_dev = to_device(heads, device)
        self.counts_dev: torch.Tensor | None = None
        self.prompt_dev: torch.Tensor | None = None
        self.nmax = 0

    def to_device(self, plan: np.ndarray, prompt_tokens: np.ndarray, device: torch.device) -> None:
        """The device values of the rows now held (``plan [B, H]``, ``prompt_tokens [B]``, host)."""
        counts = np.where(self.marks[:, self.heads], plan[:, self.heads], 0)
        self.prompt_dev = to_device(prompt_tokens, device)
        self.counts_dev = to_device(counts, device)
        self.nmax = int(counts.max()) if counts.size else 0


class LayerState:
    """Per-layer runtime state, host values as NumPy and device values as tensors.

    Attributes:
        plan: int64 ``[B, H]`` prompt tokens kept per head (host).
        prompt_tokens, base, k: int64 ``[B]`` (host): real prompt tokens, per-head base budget,
            size of the drift check's top-k sets; ``k_dev`` the latter on the device.
        model_layer: the layer's index in the model (the profile's row; the policy's own index
            counts compressible layers only).
        kernel: ``pool_scores``' kernel for these rows (an int, or per-row taps).
        active: takes part in drift checks (holds a pivot or satellite, or exchanges decisions).
        pivots: the pivot heads this process scores (indices into its store's heads; all the
            layer's pivots in one process); ``satellites`` the satellites it stores (store
            indices, the host store's order), ``sat_pivot`` the index of each one's pivot among
            the layer's pivots (``layout.pivots``), ``sat_tokens`` int64 ``[B, Ns]`` their prompt
            slots, ``sat_tokens_all`` those of every satellite of the layer (``layout.satellites``)
            and ``target_tokens_dev`` those of the satellites whose pivot this process holds
            (device). ``layout``/``index``: which rank decides what (``ClusterLayout``).
        prompt_pos: int64 ``[B, Lmax]`` logical position of each row's j-th real prompt token (host).
        reference: bool ``[B, P, Lmax]`` device: each pivot's reference top-k set as a map.
        queries: buffered decode queries ``[B, Hq, D]`` (device).
        pending: drift decisions computed on the device, acted on a later step (``refresh.Decision``).
        host: the host copies of the layer's heads that keep one (``HostKV``, one segment per row
            and held head, each ``Lmax`` rows: the row's real prompt tokens in order, then zeros;
            None: no head does).
        turn: the heads a new turn re-chooses (``TurnHeads``; None: none).
    """

    def __init__(self, plan: np.ndarray, prompt_tokens: np.ndarray, base: np.ndarray, k: np.ndarray,
                 model_layer: int, kernel: int | torch.Tensor):
        self.plan, self.prompt_tokens, self.base, self.k = plan, prompt_tokens, base, k
        self.model_layer, self.kernel = model_layer, kernel
        self.active = False
        self.k_dev: torch.Tensor | None = None
        self.pivots: list[int] = []
        self.satellites: list[int] = []
        self.sat_pivot: list[int] = []
        self.sat_tokens = np.zeros((len(plan), 0), np.int64)
        self.sat_tokens_all = np.zeros((len(plan), 0), np.int64)
        self.target_tokens_dev: torch.Tensor | None = None
        self.layout: ClusterLayout | None = None
        self.index: LayoutIndex | None = None
        self.prompt_pos = np.zeros((len(plan), 0), np.int64)
        self.reference: torch.Tensor | None = None
        self.queries: list[torch.Tensor] = []
        self.pending: list = []
        self.host: HostKV | None = None
        self.turn: TurnHeads | None = None
        # (layout_version, idx [B, P, Lmax], valid [B, P, Lmax], strides or None)
        self._pivot_index = None

    def to_device(self, device: torch.device) -> None:
        """The device copies of the per-row host values of the drift checks (after prefill and
        row changes)."""
        self.k_dev = to_device(self.k, device)
        self.target_tokens_dev = to_device(self.sat_tokens_all[:, self.layout.targets], device)

    def select_rows(self, rows_h: np.ndarray, device: torch.device) -> None:
        """Keep (reorder, repeat) the rows ``rows_h`` (int64, host) of every per-row value; the
        store does the same to its own rows."""
        self.plan, self.prompt_tokens = self.plan[rows_h], self.prompt_tokens[rows_h]
        self.base, self.k = self.base[rows_h], self.k[rows_h]
        self.sat_tokens, self.prompt_pos = self.sat_tokens[rows_h], self.prompt_pos[rows_h]
        self.sat_tokens_all = self.sat_tokens_all[rows_h]
        if isinstance(self.kernel, torch.Tensor):
            self.kernel = self.kernel.index_select(0, to_device(rows_h, self.kernel.device))
        if self.active:
            if self.reference is not None:
                self.reference = self.reference[to_device(rows_h, device)]
            self.to_device(device)
        self.queries = [q.index_select(0, to_device(rows_h, q.device)) for q in self.queries]
        if self.turn is not None:
            self.turn.marks = self.turn.marks[rows_h]
            self.turn.to_device(self.plan, self.prompt_tokens, device)
        self._pivot_index = None
        if self.host is not None:
            self.host.select_rows(rows_h)

    def pivot_index(self, store: RaggedKVStore) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Slot index and validity ``[B, P, Lmax]`` of every pivot's prompt tokens, and, when the
        pivots' first slots are evenly spaced over rows and pivots (always for one pivot and row),
        ``(first, row_step, pivot_step)`` in slots so the keys can be read as a view instead of a
        gather. Host-built, cached until the store's layout changes."""
        if self._pivot_index is None or self._pivot_index[0] != store.layout_version:
            B, H = store.num_rows, store.num_heads
            Lmax = int(self.prompt_tokens.max()) if B else 0
            j = np.arange(Lmax)
            n = self.prompt_tokens[:, None, None]
            first = store.start_h.reshape(B, H)[:, self.pivots]  # [B, P]
            idx = first[:, :, None] + np.minimum(j[None, None, :], np.maximum(n - 1, 0))
            valid = np.broadcast_to(j[None, None, :] < n, idx.shape)
            self._pivot_index = (store.layout_version, to_device(idx, store.device),
                                 to_device(valid, store.device, torch.bool), _even_spacing(first, Lmax, store))
        return self._pivot_index[1], self._pivot_index[2], self._pivot_index[3]

    def pivot_keys(self, store: RaggedKVStore) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pivot's prompt keys ``[B, P, Lmax, D]`` (a strided view where the layout allows,
        else gathered; padded slots hold other tokens and are masked by ``valid``) and ``valid``."""
        idx, valid, spacing = self.pivot_index(store)
        if spacing is None:
            return store.k[idx], valid
        first, row_step, pivot_step = spacing
        D = store.k.shape[-1]
        shape = (idx.shape[0], idx.shape[1], idx.shape[2], D)
        return store.k.as_strided(shape, (row_step * D, pivot_step * D, D, 1),
                                  store.k.storage_offset() + first * D), valid


def _even_spacing(first: np.ndarray, length: int, store: RaggedKVStore) -> tuple | None:
    """``(first, row_step, pivot_step)`` when ``first[b, p] == first + b*row_step + p*pivot_step``
    and every ``length``-slot window stays inside the buffer, else None."""
    if first.size == 0 or not store.k.is_contiguous():
        return None
    B, P = first.shape
    row_step = int(first[1, 0] - first[0, 0]) if B > 1 else 0
    pivot_step = int(first[0, 1] - first[0, 0]) if P > 1 else 0
    expected = first[0, 0] + np.arange(B)[:, None] * row_step + np.arange(P)[None, :] * pivot_step
    if not np.array_equal(first, expected) or int(first.max()) + length > store.k.shape[0]:
        return None
    return int(first[0, 0]), row_step, pivot_step

"""HeteroCache's host copies and their transfers: the write of host-held prompt tokens into store
slots (a satellite refill, a re-selection at a new turn), one copy stream per device, and the
bytes and copy time they account for.

``HostOffload`` is one part of ``HeteroCachePolicy`` (``policy.py``); the host copies themselves
are ``offload.host_kv.HostKV`` (read on the host: ``stage``), the copies
``offload.transfer.RefreshTransfer``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...offload.transfer import RefreshTransfer
from ...store.ragged import RaggedKVStore, segment_ranges_host, to_device
from .state import LayerState


class HostOffload:
    """Host-to-device writes and their bookkeeping, for ``HeteroCachePolicy``."""

    def _transfers_for(self, layer_idx: int, device: torch.device) -> RefreshTransfer:
        """The refresh transfer of a layer: one per device (layers may live on several)."""
        key = str(device)
        if key not in self._transfers:
            self._transfers[key] = RefreshTransfer(device, self._asynchronous)
        self._layer_transfer[layer_idx] = self._transfers[key]
        return self._transfers[key]

    def _write_from_host(self, layer_idx: int, store: RaggedKVStore, state: LayerState, rows_h: np.ndarray,
                         heads_h: np.ndarray, picks: np.ndarray, counts_h: np.ndarray) -> None:
        """Overwrite the first ``counts_h[i]`` slots of head ``heads_h[i]`` in row ``rows_h[i]``
        with the prompt tokens ``picks[i, :counts_h[i]]`` (host copy indices, ascending; ``picks``
        int64 ``[n, nmax]``): one host gather and one (asynchronous on CUDA) copy for the layer."""
        picks_h = picks[np.arange(picks.shape[-1])[None, :] < counts_h[:, None]]  # row after row
        segments = state.host.segment_of(rows_h, heads_h)
        k_host, v_host = state.host.stage(state.host.rows_of(segments, picks_h, counts_h))
        slots = segment_ranges_host(store.start_h[rows_h * store.num_heads + heads_h], counts_h)
        positions = state.prompt_pos[np.repeat(rows_h, counts_h), picks_h]
        self._layer_transfer[layer_idx].write(layer_idx, store, to_device(slots, store.device), k_host, v_host,
                                              to_device(positions, store.device, torch.int32))
        self.stats.tokens_moved += int(counts_h.sum())
        self.stats.bytes_moved += k_host.numel() * k_host.element_size() * 2

    def host_bytes_per_layer(self) -> dict[int, int]:
        """Bytes of the host copies, by layer (the memory report's host bytes)."""
        return {i: s.host.nbytes() for i, s in self._layers.items() if s.host is not None}

    @property
    def transfers(self) -> dict[str, RefreshTransfer]:
        """The refresh transfers by device (one per device holding host copies)."""
        return dict(self._transfers)

    def synchronize(self) -> None:
        """Wait until every refresh copy has landed."""
        for transfer in self._transfers.values():
            transfer.synchronize()

    def copy_seconds(self) -> float:
        """GPU time spent in refresh copies so far, over every device (0 without CUDA)."""
        return sum(t.copy_seconds() for t in self._transfers.values())

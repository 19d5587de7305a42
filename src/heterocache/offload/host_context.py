"""The context KV of an offloaded layer in host memory, read per decode step by indices (OmniKV's
sparse layers with ``offload=True``)."""

from __future__ import annotations

import numpy as np
import torch

from ..store.ragged import RaggedKVStore, segment_ranges_host, to_device
from .host_rows import HostRows


class HostContext:
    """The context KV of one offloaded layer in host memory (pinned when the model is on CUDA),
    packed segment after segment (``s = row * H + head``), tokens in order: segment ``s``'s context
    token ``j`` is row ``offsets[s] + j``. Read per step by indices on the model's device
    (``HostRows``: a device kernel on the pinned rows on CUDA, no host wait).

    Attributes:
        k, v: ``[N, D]`` host tensors (N: context tokens of all segments); pos: int32 ``[N]``
            logical positions (host).
        lengths_h, offsets_h: int64 ``[S]`` host arrays; offsets: the same on the model's device.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, lengths_h: np.ndarray,
                 num_heads: int, device):
        self.device, self.num_heads = torch.device(device), num_heads
        self.k_rows, self.v_rows = HostRows(k, self.device), HostRows(v, self.device)
        self.k, self.v = self.k_rows.host, self.v_rows.host
        self.pos = pos.detach().to("cpu").contiguous()
        self.lengths_h = np.asarray(lengths_h, np.int64).copy()
        self.offsets_h = np.cumsum(self.lengths_h) - self.lengths_h
        self.offsets = to_device(self.offsets_h, self.device)

    @classmethod
    def from_prompt(cls, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, device) -> HostContext:
        """From a prompt's ``key, value [B, H, L, D]`` and real tokens ``valid [B, L]`` (prefill)."""
        B, H, L, D = key.shape
        keep = valid[:, None, :].expand(B, H, L).reshape(B * H, L)
        pos = torch.arange(L, device=key.device, dtype=torch.int32).expand(B * H, L)[keep]
        lengths = keep.sum(-1).cpu().numpy()  # prefill: host reads are fine here
        return cls(key.reshape(B * H, L, D)[keep], value.reshape(B * H, L, D)[keep], pos, lengths, H, device)

    @classmethod
    def from_store(cls, store: RaggedKVStore) -> HostContext:
        """A copy of every token a store holds (the end of a later turn)."""
        slots = store.used_slots()
        return cls(store.k[slots], store.v[slots], store.pos[slots], store.length_h, store.num_heads, store.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def gather(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[S * k, D]`` on the model's device of the context tokens ``chosen
        [B, k]`` (int64 on the model's device, one choice per row for all its heads; entries past
        a segment's context are clamped, and masked by the caller). No host read of any value."""
        B, k = chosen.shape
        flat = (self.offsets.view(B, self.num_heads, 1) + chosen.view(B, 1, k)).reshape(-1)
        flat = flat.clamp(0, max(self.k.shape[0] - 1, 0))
        return self.k_rows.gather(flat), self.v_rows.gather(flat)

    def restore_into(self, store: RaggedKVStore) -> None:
        """Refill ``store`` with this context followed by the tokens it holds (decoded since)."""
        B, H, D = store.num_rows, store.num_heads, store.head_dim
        S, C = B * H, int(self.lengths_h.max()) if self.lengths_h.size else 0
        j = np.arange(C)
        inside = j[None, :] < self.lengths_h[:, None]
        rows = torch.from_numpy(np.where(inside, self.offsets_h[:, None] + j[None, :], 0).reshape(-1))
        dev = store.device
        k_ctx = self.k.index_select(0, rows).to(dev).view(B, H, C, D)
        v_ctx = self.v.index_select(0, rows).to(dev).view(B, H, C, D)
        pos_ctx = self.pos.index_select(0, rows).to(dev).view(S, C).long()
        k_dec, v_dec, valid_dec, pos_dec = store.padded()
        keep = torch.cat([torch.from_numpy(inside).to(dev).view(B, H, C), valid_dec], 2)
        positions = torch.cat([pos_ctx, pos_dec.reshape(S, -1)], 1)
        store.fill(torch.cat([k_ctx, k_dec], 2), torch.cat([v_ctx, v_dec], 2), keep, positions)

    def select_segments(self, segments: np.ndarray) -> None:
        """Keep (reorder, repeat) segments: segment i becomes old segment ``segments[i]``."""
        segments = np.asarray(segments, np.int64)
        rows = torch.from_numpy(segment_ranges_host(self.offsets_h[segments], self.lengths_h[segments]))
        k, v, pos = (t.index_select(0, rows) for t in (self.k, self.v, self.pos))
        self.__init__(k, v, pos, self.lengths_h[segments], self.num_heads, self.device)

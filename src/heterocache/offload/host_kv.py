"""KV kept in host memory, for every method that keeps KV off the device: HeteroCache's host copies
(satellites, anchors, pivots with ``pivot_offload``), OmniKV's offloaded context, ShadowKV's
candidate values.

:class:`HostKV` holds the keys and/or values (and logical positions where a method needs them) of
a set of *segments*, one per (batch row, held KV head), ``s = row * len(heads) + slot``, packed
segment after segment: row ``j`` of segment ``s`` is packed row ``offsets[s] + j``. A "row" is
whatever one index reads: a token (``[N, head_dim]``) or a chunk of tokens (ShadowKV:
``[N, chunk_size * head_dim]``). The buffers live in page-locked (pinned) memory when the model is
on CUDA, plain CPU memory otherwise.

Two read paths, for two kinds of index:

- ``gather``: indices that live on the device (a per-step selection computed on the accelerator:
  OmniKV's filter-layer choice, ShadowKV's chunks). Copying them to the host first would make every
  decode step wait for the device. On CUDA, with unified virtual addressing (every 64-bit CUDA
  platform) pinned host memory is directly addressable by the device at its host address, so each
  pinned buffer is wrapped (through ``__cuda_array_interface__``, zero-copy) as a CUDA tensor that
  aliases it, and ``index_select`` on that alias is a device kernel whose loads of the chosen rows
  cross the host link (PCIe or NVLink-C2C). Indices never leave the device and the host never
  blocks; the cost per call is the bytes of the chosen rows at the link's bandwidth (rows of
  ``chunk * head_dim`` contiguous elements, e.g. 2 KiB in bf16 for ShadowKV's 8 x 128, are read as
  whole cache lines), the same traffic as ShadowKV's own gather kernel on its pinned value cache.
  The alias is checked to point at the pinned buffer itself; where it cannot be made (no NumPy, a
  non-UVA platform, a pointer the driver does not report on the model's device) ``gather`` falls
  back to copying the indices to the host (a synchronisation per call, counted in
  ``sync_gathers``) and warns once. On CPU models it is a plain ``index_select``.
- ``stage``: indices the host already holds (HeteroCache's refresh, decided on the device and acted
  on ``DECISION_LAG`` steps later; a new turn's picks). The rows are gathered on the host into fresh
  pinned staging that nobody else writes, the source of one asynchronous host-to-device copy per
  layer on the side stream of ``transfer.RefreshTransfer``, which overlaps decoding; a UVA read
  there would instead make the decode stream's own kernel wait on the host link.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..store.ragged import RaggedKVStore, segment_ranges_host, to_device

__all__ = ["HostKV", "device_alias_of_pinned"]

# An integer NumPy typestr of each element size: the alias is made with it and viewed back as the
# real dtype (bfloat16 has no NumPy type).
_INT_VIEW = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


class _PinnedInterface:
    """A ``__cuda_array_interface__`` (v3) describing a contiguous pinned CPU tensor; holds it alive."""

    def __init__(self, pinned: torch.Tensor):
        typestr = _INT_VIEW[pinned.element_size()][1]
        self.tensor = pinned
        self.__cuda_array_interface__ = {
            "shape": tuple(pinned.shape),
            "typestr": typestr,
            "data": (pinned.data_ptr(), False),
            "version": 3,
            "strides": None,
        }


def device_alias_of_pinned(pinned: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor on ``device`` aliasing the contiguous pinned CPU tensor ``pinned`` (zero-copy, UVA),
    or None where the platform cannot make one. The alias keeps ``pinned`` alive."""
    device = torch.device(device)
    if device.type != "cuda" or not pinned.is_pinned() or not pinned.is_contiguous() or pinned.numel() == 0:
        return None
    if pinned.element_size() not in _INT_VIEW:
        return None
    try:
        with torch.cuda.device(device):
            alias = torch.as_tensor(_PinnedInterface(pinned), device=device)
    except (RuntimeError, TypeError, ValueError):
        return None
    if alias.data_ptr() != pinned.data_ptr() or alias.device != device:
        return None  # torch copied instead of aliasing: not zero-copy
    return alias.view(pinned.dtype)


def _host_copy(t: torch.Tensor | None, pin: bool) -> torch.Tensor | None:
    """A fresh contiguous CPU copy of ``t`` (pinned when ``pin``); synchronous, so the buffer is
    complete before any kernel reads it (construction happens at a prefill or turn, where waiting
    is fine)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    host.copy_(t.detach())
    return host


class HostKV:
    """Keys/values of a set of segments in host memory, packed segment after segment.

    Args:
        lengths: int64 ``[S]`` rows per segment (host: NumPy or a list), ``S = rows * len(heads)``.
        heads: the KV heads a batch row's segments hold, in segment order.
        device: the model's device (where ``gather``'s indices come from and its rows go).
        k, v: ``[N, W]`` rows (``N = sum(lengths)``), any device, or None (ShadowKV keeps values
            only); copied once into host buffers, pinned when ``device`` is CUDA.
        pos: int ``[N]`` logical position of each row (kept as int32 on the host), or None.

    Attributes:
        k, v: ``[N, W]`` CPU tensors (pinned on CUDA) or None; pos: int32 ``[N]`` CPU or None.
        lengths_h, offsets_h: int64 ``[S]`` NumPy; offsets: the same offsets on ``device``.
        mode: how ``gather`` reads: "cpu" (plain index_select), "uva" (device kernel on the pinned
            buffers), "empty" (no rows) or "sync" (fallback: indices copied to the host each call).
        sync_gathers: gathers that had to copy their indices to the host ("sync" mode).
    """

    _warned = False

    def __init__(self, lengths, heads, device, *, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 pos: torch.Tensor | None = None):
        self.device = torch.device(device)
        self.heads = [int(h) for h in heads]
        self.pinned = self.device.type == "cuda"
        self.lengths_h = np.asarray(lengths, np.int64).reshape(-1).copy()
        self.offsets_h = np.cumsum(self.lengths_h) - self.lengths_h
        self.offsets = to_device(self.offsets_h, self.device)
        self.k, self.v = _host_copy(k, self.pinned), _host_copy(v, self.pinned)
        self.pos = None if pos is None else pos.detach().to("cpu", torch.int32).contiguous()
        # head -> its slot among a row's segments, as an array: batched look-ups (-1: not held)
        self._slot_of = np.full(max(self.heads, default=-1) + 1, -1, np.int64)
        self._slot_of[np.asarray(self.heads, np.int64)] = np.arange(len(self.heads))
        self._open_device_reads()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_prompt(cls, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, device, *,
                    heads=None, padded: bool = False, positions: bool = False) -> HostKV:
        """The real tokens of a prompt's ``key, value [B, H, L, D]`` (``valid``: bool ``[B, L]``),
        for the KV heads ``heads`` (default all), each segment's tokens in order: its ``j``-th row
        is the row's ``j``-th real token (left padding or any other mask).

        Args:
            padded: every segment gets ``Lmax`` rows (the batch's longest prompt), real tokens
                first, zeros after, so a row's held heads read as one ``[len(heads), Lmax, D]``
                block (HeteroCache's turn scoring). False: real tokens only (OmniKV).
            positions: keep each token's column of the prompt as its position (OmniKV's
                context, which goes back into the store at a later turn).
        """
        B, H, _, D = key.shape
        heads = list(range(H)) if heads is None else [int(h) for h in heads]
        n = valid.sum(-1)
        Lmax = int(n.max()) if B else 0  # prefill: host reads are fine here
        # The column of each row's j-th real token at j.
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[:, :Lmax]  # [B, Lmax]
        real = torch.arange(Lmax, device=key.device)[None, :] < n[:, None]  # [B, Lmax]
        held = torch.tensor(heads, dtype=torch.long, device=key.device)
        index = order[:, None, :, None].expand(B, len(heads), Lmax, D)
        k = key.index_select(1, held).gather(2, index)  # [B, Hh, Lmax, D]
        v = value.index_select(1, held).gather(2, index)
        keep = real[:, None, :].expand(B, len(heads), Lmax)
        pos = order.to(torch.int32)[:, None, :].expand(B, len(heads), Lmax)
        if padded:
            zero = ~keep[..., None]
            k, v = k.masked_fill(zero, 0), v.masked_fill(zero, 0)
            k, v, pos = k.reshape(-1, D), v.reshape(-1, D), pos.reshape(-1)
            lengths = np.full(B * len(heads), Lmax, np.int64)
        else:
            k, v, pos = k[keep], v[keep], pos[keep]
            lengths = keep.sum(-1).reshape(-1).cpu().numpy()
        return cls(lengths, heads, device, k=k, v=v, pos=pos if positions else None)

    @classmethod
    def from_store(cls, store: RaggedKVStore) -> HostKV:
        """A copy of every token a store holds, with their positions (the end of a later turn)."""
        slots = store.used_slots()
        return cls(store.length_h, range(store.num_heads), store.device, k=store.k[slots], v=store.v[slots],
                   pos=store.pos[slots])

    def _open_device_reads(self) -> None:
        """The device aliases ``gather`` reads through on CUDA (see the module docstring)."""
        self.sync_gathers = 0
        self._alias = {}
        if self.device.type == "cpu":
            self.mode = "cpu"
            return
        if self.num_tokens == 0:
            self.mode = "empty"  # nothing to gather: no alias needed, nothing to warn about
            return
        self._alias = {name: device_alias_of_pinned(t, self.device) for name, t in self._buffers().items()}
        if all(a is not None for a in self._alias.values()):
            self.mode = "uva"
            return
        self.mode = "sync"
        if not HostKV._warned:
            HostKV._warned = True
            warnings.warn(
                "pinned host memory cannot be read from the device here (no unified addressing); host KV is "
                "gathered after copying its indices to the host, which synchronises every decode step",
                RuntimeWarning, stacklevel=3,
            )

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in (("k", self.k), ("v", self.v)) if t is not None}

    # ------------------------------------------------------------------ sizes and look-ups
    @property
    def num_tokens(self) -> int:
        """Packed rows N."""
        return int(self.lengths_h.sum())

    def nbytes(self) -> int:
        """Host bytes: keys, values and positions held."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos) if t is not None)

    def segment_of(self, rows, heads) -> np.ndarray:
        """The segments of batch rows ``rows`` and KV heads ``heads`` (host ints or arrays,
        broadcast together; every head must be held): int64 NumPy."""
        slots = self._slot_of[np.asarray(heads, np.int64)]
        return np.asarray(rows, np.int64) * len(self.heads) + slots

    def segment(self, s: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values ``[lengths[s], W]`` of segment ``s`` (host views: inspection, tests)."""
        lo, hi = int(self.offsets_h[s]), int(self.offsets_h[s] + self.lengths_h[s])
        return tuple(None if t is None else t[lo:hi] for t in (self.k, self.v))

    def rows_of(self, segments, within=None, counts=None) -> np.ndarray:
        """Packed row indices (int64 NumPy) of rows ``within`` of ``segments`` (host arrays):
        ``counts[i]`` consecutive entries of ``within`` for ``segments[i]``; ``within`` None: every
        row of each segment, in order."""
        segments = np.asarray(segments, np.int64)
        if within is None:
            return segment_ranges_host(self.offsets_h[segments], self.lengths_h[segments])
        return np.repeat(self.offsets_h[segments], np.asarray(counts, np.int64)) + np.asarray(within, np.int64)

    # ------------------------------------------------------------------ device-index path (decode step)
    def gather(self, within: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values (None where not held) ``[S * k, W]`` on the model's device: rows
        ``within [R, k]`` (int64 on the model's device) of every segment, one index list per
        group of ``S / R`` consecutive segments (``R = S``: one per segment; ``R = rows``: one
        per batch row, for all its heads). Entries past a segment's rows are clamped into the
        buffer (the caller masks them). No host read of any value (except in "sync" mode)."""
        R, k = within.shape
        S = len(self.lengths_h)
        flat = (self.offsets.view(R, S // max(R, 1), 1) + within.view(R, 1, k)).reshape(-1)
        flat = flat.clamp(0, max(self.num_tokens - 1, 0))
        if self.mode == "sync":
            self.sync_gathers += 1
            flat = flat.cpu()  # waits for the device: the fallback's one synchronisation
        return self._read(self.k, "k", flat), self._read(self.v, "v", flat)

    def _read(self, host: torch.Tensor | None, name: str, index: torch.Tensor) -> torch.Tensor | None:
        if host is None:
            return None
        if self.mode == "cpu":
            return host.index_select(0, index)
        if self.mode == "uva":
            return self._alias[name].index_select(0, index)
        if self.mode == "empty":  # no rows: only an empty index can be asked for
            return torch.empty((index.shape[0], *host.shape[1:]), dtype=host.dtype, device=self.device)
        return host.index_select(0, index).to(self.device)  # "sync": a plain copy, the host waited already

    # ------------------------------------------------------------------ host-index path (refresh, turns)
    def stage(self, rows: np.ndarray, keys: bool = True, values: bool = True) -> tuple[torch.Tensor, ...]:
        """Packed rows ``rows`` (int64 host ``[n]``, e.g. from ``rows_of``) of the keys and/or
        values, ``[n, W]`` each, in fresh memory (pinned on CUDA) that nobody else writes: the
        source of one asynchronous copy (``RefreshTransfer.write`` / ``fetch``). Every row in
        order is the buffer itself (never written after construction, so as safe a source)."""
        rows = np.asarray(rows, np.int64)
        whole = len(rows) == self.num_tokens and np.array_equal(rows, np.arange(len(rows)))
        flat = torch.from_numpy(rows)
        out = []
        for host in [t for t, want in ((self.k, keys), (self.v, values)) if want and t is not None]:
            if whole:
                out.append(host)
                continue
            staged = torch.empty(len(rows), *host.shape[1:], dtype=host.dtype, pin_memory=self.pinned)
            torch.index_select(host, 0, flat, out=staged)
            out.append(staged)
        return tuple(out)

    # ------------------------------------------------------------------ rows and turns
    def select_segments(self, segments) -> None:
        """Keep (reorder, repeat) segments: segment ``i`` becomes old segment ``segments[i]``
        (host int64; not a decode-step operation). New host buffers (pinned on CUDA)."""
        segments = np.asarray(segments, np.int64)
        rows = torch.from_numpy(self.rows_of(segments))
        k, v, pos = (None if t is None else t.index_select(0, rows) for t in (self.k, self.v, self.pos))
        self.__init__(self.lengths_h[segments], self.heads, self.device, k=k, v=v, pos=pos)

    def select_rows(self, rows) -> None:
        """Keep (reorder, repeat) batch rows (beam search, batch expansion): every held head of
        row ``i`` becomes old row ``rows[i]``'s (host int64)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        self.select_segments((rows[:, None] * len(self.heads) + np.arange(len(self.heads))).reshape(-1))

    def restore_into(self, store: RaggedKVStore) -> None:
        """Refill ``store`` with these segments (every head of every row, with positions: the
        store's own layout) followed by the tokens it holds (decoded since). A later turn, not a
        decode step: synchronous copies."""
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

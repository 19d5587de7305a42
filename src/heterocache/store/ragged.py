"""Packed per-head KV storage for one layer.

Every (batch row, KV head) pair is a *segment* ``s = row * num_heads + head`` with its own length.
All segments of a layer live in one flat buffer pair ``k, v: [capacity, head_dim]``; segment ``s``
owns the slots ``[start[s], start[s] + cap[s])`` and uses the first ``length[s]`` of them. Nothing
is padded to the layer's longest head: the only slack is the room reserved for tokens still to be
appended, rounded up to ``block_size`` so that the buffer viewed as ``[num_blocks, block_size, D]``
has exactly one owner segment per block (what the block-wise decode attention and a paged kernel
read).

Every stored token also records its logical position (``pos``), so crops, refreshes and the
memory report never need to guess which token a slot holds.

Host mirrors: ``start``, ``cap`` and ``length`` exist twice, as device tensors (what kernels and
index arithmetic read) and as NumPy arrays ``start_h``, ``cap_h``, ``length_h`` updated alongside
them. Every decision the host takes (growth, launch shapes, how many tokens an eviction removes)
reads the mirrors, so a decode step never waits for the device to report a value.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host array (NumPy or list) as a tensor on ``device`` without blocking the host: on CUDA
    through pinned memory and a non-blocking copy (torch's pinned allocator keeps the staging block
    alive until the copy has run)."""
    host = torch.from_numpy(np.array(values, copy=True)).to(dtype)  # a copy: never aliases a mirror
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def segment_ranges_host(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` for every segment (NumPy, no Python loop).

    Args:
        starts, lengths: int64 ``[S]`` host arrays.

    Returns:
        int64 ``[sum(lengths)]``: the slot indices of all segments, segment after segment.
    """
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)


def _round_up(x: np.ndarray, multiple: int) -> np.ndarray:
    return (x + multiple - 1) // multiple * multiple


class RaggedKVStore:
    """Packed, per-(row, head) ragged KV storage of one attention layer.

    Args:
        num_rows: batch size B.
        num_heads: KV heads H of the layer.
        head_dim: D.
        dtype, device: of the stored keys and values.
        block_size: slot alignment of each segment (default 64).
        reserve: free slots a segment gets when it is filled (default 128). A segment that runs
            out grows by ``max(reserve, length // 8)`` so long decodes reallocate O(log n) times.

    Attributes:
        k, v: ``[capacity, D]`` flat buffers.
        pos: int32 ``[capacity]`` logical position of each slot (-1 where unused).
        start, cap, length: int64 ``[S]`` device tensors with ``S = B * H``.
        start_h, cap_h, length_h: the same as int64 NumPy arrays (host mirrors, always equal).
        layout_version: bumped whenever ``start``/``cap`` change (plans keyed on it stay valid
            until then).
        slot_buffers: per-slot policy state kept aligned with the tokens (``add_slot_buffer``).
    """

    def __init__(
        self,
        num_rows: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = 64,
        reserve: int = 128,
    ):
        if block_size < 1 or reserve < 0:
            raise ValueError(f"block_size must be >= 1 and reserve >= 0, got {block_size}, {reserve}")
        self.num_rows, self.num_heads, self.head_dim = num_rows, num_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.block_size, self.reserve = block_size, reserve
        self.slot_buffers: dict[str, torch.Tensor] = {}
        self._slot_fill: dict[str, float] = {}
        self.layout_version = 0
        self._allocate(np.zeros(num_rows * num_heads, np.int64))
        self._set_length(np.zeros(self.num_segments, np.int64))

    # ----------------------------------------------------------------- layout
    @property
    def num_segments(self) -> int:
        return self.num_rows * self.num_heads

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    def lengths(self) -> torch.Tensor:
        """Stored tokens per (row, head): int64 ``[B, H]`` (device)."""
        return self.length.view(self.num_rows, self.num_heads)

    def lengths_host(self) -> np.ndarray:
        """Stored tokens per (row, head): int64 ``[B, H]`` NumPy (the host mirror; a copy)."""
        return self.length_h.reshape(self.num_rows, self.num_heads).copy()

    def max_length(self) -> int:
        """Longest segment (host value)."""
        return int(self.length_h.max()) if self.num_segments else 0

    def _set_length(self, length_h: np.ndarray, length: torch.Tensor | None = None) -> None:
        """Set both copies of the lengths (``length`` when the device already has them)."""
        self.length_h = np.asarray(length_h, np.int64).copy()
        self.length = length if length is not None else to_device(self.length_h, self.device)

    def _allocate(self, caps: np.ndarray) -> None:
        """Fresh zeroed buffers with the given per-segment capacities (multiples of block_size)."""
        caps = np.asarray(caps, np.int64)
        self.cap_h = caps.copy()
        self.start_h = np.cumsum(caps) - caps
        self.cap, self.start = to_device(self.cap_h, self.device), to_device(self.start_h, self.device)
        total = int(caps.sum())
        # Zeros, not empty: masked slots are multiplied by a zero probability, and 0 * NaN garbage
        # from uninitialised memory would poison the sum.
        self.k = torch.zeros(total, self.head_dim, dtype=self.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((total,), -1, dtype=torch.int32, device=self.device)
        self._allocate_slot_buffers(total)
        nblocks = caps // self.block_size
        owner = np.repeat(np.arange(len(caps), dtype=np.int64), nblocks)
        self.block_owner = to_device(owner, self.device)
        self.block_offset = to_device(np.arange(len(owner), dtype=np.int64) * self.block_size - self.start_h[owner],
                                      self.device)
        self.layout_version += 1

    def _capacity_for(self, needed: np.ndarray, growing: bool = False) -> np.ndarray:
        # A fresh fill reserves a fixed room; a segment that ran out grows geometrically so that a
        # long decode reallocates O(log n) times.
        needed = np.asarray(needed, np.int64)
        extra = np.maximum(needed // 8, self.reserve) if growing else np.full_like(needed, self.reserve)
        return _round_up(needed + extra, self.block_size)

    def used_slots(self) -> torch.Tensor:
        """Slot indices of all stored tokens, segment after segment (int64 ``[sum(length)]``)."""
        return to_device(segment_ranges_host(self.start_h, self.length_h), self.device)

    # ----------------------------------------------------------------- writes
    def fill(self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace the whole store with the kept tokens of a dense prompt, in their original order.

        Args:
            key, value: ``[B, H, L, D]``.
            keep: bool ``[B, H, L]``: which tokens each (row, head) keeps.
            positions: int ``[L]``: logical position of each of the L tokens (or ``[B * H, L]``,
                one row per segment, when segments hold different tokens at a column).
        """
        B, H, L, D = key.shape
        if (B, H, D) != (self.num_rows, self.num_heads, self.head_dim) or keep.shape != (B, H, L):
            raise ValueError(f"fill: shapes {tuple(key.shape)} / {tuple(keep.shape)} do not fit store {self}")
        keep = keep.reshape(B * H, L)
        counts = keep.sum(-1)
        counts_h = counts.cpu().numpy()  # prefill: the one read of the selection's sizes
        self._allocate(self._capacity_for(counts_h))
        self._set_length(counts_h)
        rank = torch.cumsum(keep, -1) - 1
        dest = (self.start[:, None] + rank)[keep]
        self.k[dest] = key.reshape(B * H, L, D)[keep].to(self.dtype)
        self.v[dest] = value.reshape(B * H, L, D)[keep].to(self.dtype)
        self.pos[dest] = positions.to(torch.int32).expand(B * H, L)[keep]

    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, valid=None) -> None:
        """Append new tokens at the end of every segment.

        Args:
            key, value: ``[B, H, q, D]``.
            positions: int ``[q]`` logical positions of the new tokens.
            valid: optional bool ``[B, q]``: tokens a row really has (False = padding, not stored).
                Counting them reads the device once (a later turn, not the decode step).
        """
        B, H, q, D = key.shape
        if (B, H, D) != (self.num_rows, self.num_heads, self.head_dim):
            raise ValueError(f"append: shape {tuple(key.shape)} does not fit store {self}")
        if q == 1 and valid is None:  # the decode step: one slot per segment, no masking, no read
            self.begin_decode_append()
            self.append_decode(key, value, positions)
            return
        if valid is None:
            valid_s = torch.ones(B * H, q, dtype=torch.bool, device=key.device)
            added_h = np.full(B * H, q, np.int64)
        else:
            valid_s = valid[:, None, :].expand(B, H, q).reshape(B * H, q)
            added_h = np.repeat(valid.sum(-1).cpu().numpy().astype(np.int64), H)
        self.ensure_room(added_h)
        dest = (self.start[:, None] + self.length[:, None] + torch.cumsum(valid_s, -1) - 1)[valid_s]
        self.k[dest] = key.reshape(B * H, q, D)[valid_s].to(self.dtype)
        self.v[dest] = value.reshape(B * H, q, D)[valid_s].to(self.dtype)
        self.pos[dest] = positions.to(torch.int32).expand(B * H, q)[valid_s]
        self._reset_slot_buffers(dest)
        self._set_length(self.length_h + added_h)

    def begin_decode_append(self) -> None:
        """The host half of a decode step's append: grow if a segment is full, then count the token
        in the host mirror (``append_decode`` does the device half)."""
        self.ensure_room(1)
        self.length_h = self.length_h + 1

    def append_decode(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """The device half of a decode step's append (after ``begin_decode_append``): one token per
        segment written behind its stored ones. Device ops only, no host value read or decided:
        a compiler can capture it (``torch.compile(fullgraph=True)``, CUDA graphs).

        Args:
            key, value: ``[B, H, 1, D]``; positions: int ``[1]``.
        """
        S, D = self.num_segments, self.head_dim
        dest = self.start + self.length
        self.k[dest] = key.reshape(S, D).to(self.dtype)
        self.v[dest] = value.reshape(S, D).to(self.dtype)
        self.pos[dest] = positions.to(torch.int32).expand(S)
        self._reset_slot_buffers(dest)
        self.length = self.length + 1

    def ensure_room(self, tokens) -> None:
        """Grow (host decision) if some segment cannot take ``tokens`` more (an int, or int64
        ``[S]`` per segment)."""
        needed = self.length_h + tokens
        if (needed > self.cap_h).any():
            self._grow(needed)

    def _grow(self, needed: np.ndarray) -> None:
        """Reallocate so every segment has room for ``needed`` tokens (copies the used slots once)."""
        caps = np.where(needed > self.cap_h, self._capacity_for(needed, growing=True), self.cap_h)
        self._relayout(np.arange(self.num_segments), caps)

    def _relayout(self, source_segments: np.ndarray, caps: np.ndarray) -> None:
        """New buffers whose segment i holds a copy of old segment ``source_segments[i]``."""
        source_segments = np.asarray(source_segments, np.int64)
        old_k, old_v, old_pos = self.k, self.v, self.pos
        old_slot_buffers = dict(self.slot_buffers)
        lengths = self.length_h[source_segments]
        src = to_device(segment_ranges_host(self.start_h[source_segments], lengths), self.device)
        self._allocate(caps)
        self._set_length(lengths)
        dest = to_device(segment_ranges_host(self.start_h, lengths), self.device)
        self.k[dest], self.v[dest], self.pos[dest] = old_k[src], old_v[src], old_pos[src]
        for name, old in old_slot_buffers.items():
            self.slot_buffers[name][dest] = old[src]

    def select_rows(self, rows) -> None:
        """Keep (and reorder or repeat) batch rows: row i of the result is old row ``rows[i]``."""
        rows = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        segs = (rows[:, None] * self.num_heads + np.arange(self.num_heads)).reshape(-1)
        caps = self.cap_h[segs]
        self.num_rows = len(rows)
        self._relayout(segs, caps)

    def truncate_positions(self, limit: int) -> None:
        """Drop every stored token whose logical position is >= ``limit`` (tokens are in order)."""
        slots = self.used_slots()
        seg = to_device(np.repeat(np.arange(self.num_segments), self.length_h), self.device)
        drop = torch.zeros(self.num_segments, dtype=torch.long, device=self.device)
        drop.index_add_(0, seg, (self.pos[slots] >= limit).long())
        self._set_length(self.length_h - drop.cpu().numpy())

    def write_segment_tokens(self, segment: int, slots_from: int, key, value, positions) -> None:
        """Overwrite ``len(positions)`` slots of one segment, starting at its slot ``slots_from``."""
        n = key.shape[0]
        if slots_from + n > int(self.length_h[segment]):
            raise IndexError("write past the stored length of the segment")
        lo = int(self.start_h[segment]) + slots_from
        self.k[lo : lo + n], self.v[lo : lo + n] = key.to(self.dtype), value.to(self.dtype)
        self.pos[lo : lo + n] = positions.to(torch.int32)

    # ----------------------------------------------------------------- eviction
    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Evict tokens: keep only the marked tokens of every segment, in their order, packed at the
        front of the segment (capacities and starts do not change; see ``shrink``).

        Freed slots are zeroed (``pos`` -1, slot buffers back to their fill value). Any mask: reads
        the new lengths from the device once (prefill-time eviction); the decode step's one-token
        eviction is ``drop_one``.

        Args:
            keep: bool ``[B, H, M]`` or ``[S, M]`` aligned with ``padded()``: ``keep[s, i]`` says
                whether the i-th stored token of segment s stays. ``M`` must be at least the longest
                segment; entries at or beyond a segment's length are ignored.

        Returns:
            int64 ``[S]``: tokens evicted per segment.
        """
        S = self.num_segments
        keep = keep.to(self.device).reshape(S, -1)
        M = self.max_length()
        if keep.shape[1] < M:
            raise ValueError(f"compact: keep has {keep.shape[1]} columns, the longest segment holds {M}")
        keep = keep[:, :M]
        ar = torch.arange(M, device=self.device)
        inside = ar[None, :] < self.length[:, None]
        keep = keep.bool() & inside
        new_length = keep.sum(-1)
        new_index = torch.cumsum(keep.long(), -1) - 1
        src = (self.start[:, None] + ar[None, :])[keep]
        dest = (self.start[:, None] + new_index)[keep]
        # Advanced indexing gathers the sources into a new tensor before writing: overlap is safe.
        self.k[dest], self.v[dest], self.pos[dest] = self.k[src], self.v[src], self.pos[src]
        for buf in self.slot_buffers.values():
            buf[dest] = buf[src]
        new_length_h = new_length.cpu().numpy()
        freed = to_device(segment_ranges_host(self.start_h + new_length_h, self.length_h - new_length_h), self.device)
        if freed.numel():
            self.k[freed] = 0
            self.v[freed] = 0
            self.pos[freed] = -1
            self._reset_slot_buffers(freed)
        evicted = self.length - new_length
        self._set_length(new_length_h, new_length)
        return evicted

    def drop_one(self, column: torch.Tensor, evicting: np.ndarray) -> None:
        """Evict at most one token per segment, keeping order, without reading the device (the
        decode step of an evicting policy).

        Args:
            column: int64 ``[S]`` device: index (among the segment's stored tokens) of the token to
                drop; ignored where ``evicting`` is False.
            evicting: bool ``[S]`` host: which segments lose a token.

        Every stored token behind the dropped one moves one slot forward: one gather and one write
        per buffer over the layer's stored tokens, index arithmetic only (no host round trip).
        """
        evicting = np.asarray(evicting, bool)
        if not evicting.any():
            return
        new_h = self.length_h - evicting
        M = int(new_h.max())
        ev = to_device(evicting, self.device, torch.bool) if not evicting.all() else None
        new_len = self.length - (ev.long() if ev is not None else 1)
        d = column if ev is None else torch.where(ev, column, torch.full_like(column, M))
        # Column i of a segment takes its old column i (+1 from the dropped one on). Columns past the
        # new length repeat the last kept column's (dest, src) pair: duplicates write equal values and
        # never reach into the next segment.
        i = torch.minimum(torch.arange(M, device=self.device)[None, :], (new_len - 1).clamp_min(0)[:, None])
        dest = self.start[:, None] + i
        src = dest + (i >= d[:, None]).long()
        # The slot freed at the old end: cleared where a token was dropped, rewritten unchanged elsewhere.
        freed = self.start + torch.minimum(new_len, (self.length - 1).clamp_min(0))
        mask = torch.ones_like(freed, dtype=torch.bool) if ev is None else ev
        buffers = [(self.k, 0.0), (self.v, 0.0), (self.pos, -1)]
        buffers += [(buf, self._slot_fill[name]) for name, buf in self.slot_buffers.items()]
        for buf, fill in buffers:
            buf[dest] = buf[src]
            old = buf[freed]
            buf[freed] = old.masked_fill(mask.view(-1, *([1] * (old.dim() - 1))), fill)
        self._set_length(new_h, new_len)

    def shrink(self) -> None:
        """Give back unused capacity: every segment whose capacity exceeds what a fresh allocation of
        its tokens would reserve is reallocated to that size (one copy of the layer, only if needed)."""
        caps = np.minimum(self.cap_h, self._capacity_for(self.length_h))
        if not np.array_equal(caps, self.cap_h):
            self._relayout(np.arange(self.num_segments), caps)

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot index of the i-th stored token of every segment, padded to the longest segment.

        Returns:
            ``idx``: int64 ``[S, M]`` (0 where the segment is shorter), ``valid``: bool ``[S, M]``.
            ``self.k[idx]`` is ``padded()``'s keys as ``[S, M, D]``; ``buf[idx]`` reads a slot buffer
            in the same layout.
        """
        M = self.max_length()
        ar = torch.arange(M, device=self.device)
        valid = ar[None, :] < self.length[:, None]
        idx = torch.where(valid, self.start[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
        return idx, valid

    # ----------------------------------------------------------------- per-slot policy state
    def add_slot_buffer(self, name: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> torch.Tensor:
        """A per-slot tensor that the store keeps aligned with its tokens (e.g. H2O's accumulated
        attention): ``[capacity]``, moved with the tokens by reallocation, ``select_rows``,
        ``compact`` and ``shrink``; slots of newly appended tokens and freed slots hold ``fill``.
        ``write_segment_tokens`` leaves the values of the overwritten slots as they were.

        Returns:
            the buffer (initialised to ``fill``); read it again with ``slot_buffer(name)`` after any
            store operation, which may replace it.

        Raises:
            ValueError: a buffer of that name exists.
        """
        if name in self.slot_buffers:
            raise ValueError(f"slot buffer {name!r} exists")
        self._slot_fill[name] = fill
        self.slot_buffers[name] = torch.full((self.capacity,), fill, dtype=dtype, device=self.device)
        return self.slot_buffers[name]

    def slot_buffer(self, name: str) -> torch.Tensor:
        """The current ``[capacity]`` tensor of a slot buffer (see ``add_slot_buffer``)."""
        return self.slot_buffers[name]

    def remove_slot_buffer(self, name: str) -> None:
        """Forget a slot buffer (no error if absent)."""
        self.slot_buffers.pop(name, None)
        self._slot_fill.pop(name, None)

    def _allocate_slot_buffers(self, total: int) -> None:
        for name, buf in self.slot_buffers.items():
            self.slot_buffers[name] = torch.full((total,), self._slot_fill[name], dtype=buf.dtype, device=self.device)

    def _reset_slot_buffers(self, slots: torch.Tensor) -> None:
        for name, buf in self.slot_buffers.items():
            buf[slots] = self._slot_fill[name]

    # ----------------------------------------------------------------- reads
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copy padded to the longest segment (for multi-token queries on a filled cache).

        Returns:
            ``k, v: [B, H, M, D]``, ``valid: bool [B, H, M]``, ``pos: int64 [B, H, M]`` (M = max length).
        """
        idx, valid = self.padded_index()
        M = idx.shape[1]
        shape = (self.num_rows, self.num_heads, M)
        return (
            self.k[idx].view(*shape, self.head_dim),
            self.v[idx].view(*shape, self.head_dim),
            valid.view(shape),
            self.pos[idx].long().view(shape),
        )

    def segment(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and positions stored by segment ``s`` (views, ``[length, D]``)."""
        lo, n = int(self.start_h[s]), int(self.length_h[s])
        return self.k[lo : lo + n], self.v[lo : lo + n], self.pos[lo : lo + n]

    # ----------------------------------------------------------------- accounting
    def bytes_allocated(self) -> int:
        extra = sum(buf.numel() * buf.element_size() for buf in self.slot_buffers.values())
        return self.k.numel() * self.k.element_size() * 2 + self.pos.numel() * self.pos.element_size() + extra

    def bytes_used(self) -> int:
        return int(self.length_h.sum()) * self.head_dim * self.k.element_size() * 2

    def __repr__(self) -> str:
        return (
            f"RaggedKVStore(rows={self.num_rows}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"stored={int(self.length_h.sum())}, capacity={self.capacity}, dtype={self.dtype})"
        )

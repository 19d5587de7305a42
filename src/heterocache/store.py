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
"""

from __future__ import annotations

import torch


def segment_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(start, start + length)`` for every segment, without a Python loop.

    Args:
        starts: int64 ``[S]``.
        lengths: int64 ``[S]``.

    Returns:
        int64 ``[sum(lengths)]``: the slot indices of all segments, segment after segment.
    """
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=starts.device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=starts.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return starts[seg] + torch.arange(total, device=starts.device) - first[seg]


#: ``compact`` shifts segments one by one (Python loop) only up to this many segments per layer.
_SHIFT_MAX_SEGMENTS = 64


def _round_up(x: torch.Tensor, multiple: int) -> torch.Tensor:
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
        start, cap, length: int64 ``[S]`` with ``S = B * H``.
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
        S = num_rows * num_heads
        zeros = torch.zeros(S, dtype=torch.long, device=self.device)
        self.start, self.cap, self.length = zeros, zeros.clone(), zeros.clone()
        self.slot_buffers: dict[str, torch.Tensor] = {}
        self._slot_fill: dict[str, float] = {}
        self._allocate(zeros)

    # ----------------------------------------------------------------- layout
    @property
    def num_segments(self) -> int:
        return self.num_rows * self.num_heads

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    def lengths(self) -> torch.Tensor:
        """Stored tokens per (row, head): int64 ``[B, H]``."""
        return self.length.view(self.num_rows, self.num_heads)

    def _allocate(self, caps: torch.Tensor) -> None:
        """Fresh zeroed buffers with the given per-segment capacities (multiples of block_size)."""
        self.cap = caps
        self.start = torch.cumsum(caps, 0) - caps
        total = int(caps.sum())
        # Zeros, not empty: masked slots are multiplied by a zero probability, and 0 * NaN garbage
        # from uninitialised memory would poison the sum.
        self.k = torch.zeros(total, self.head_dim, dtype=self.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((total,), -1, dtype=torch.int32, device=self.device)
        self._allocate_slot_buffers(total)
        nblocks = caps // self.block_size
        self.block_owner = torch.repeat_interleave(torch.arange(len(caps), device=self.device), nblocks)
        nb = int(nblocks.sum())
        self.block_offset = torch.arange(nb, device=self.device) * self.block_size - self.start[self.block_owner]

    def _capacity_for(self, needed: torch.Tensor, growing: bool = False) -> torch.Tensor:
        # A fresh fill reserves a fixed room; a segment that ran out grows geometrically so that a
        # long decode reallocates O(log n) times.
        extra = torch.clamp(needed // 8, min=self.reserve) if growing else torch.full_like(needed, self.reserve)
        return _round_up(needed + extra, self.block_size)

    def used_slots(self) -> torch.Tensor:
        """Slot indices of all stored tokens, segment after segment (int64 ``[sum(length)]``)."""
        return segment_ranges(self.start, self.length)

    # ----------------------------------------------------------------- writes
    def fill(self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace the whole store with the kept tokens of a dense prompt, in their original order.

        Args:
            key, value: ``[B, H, L, D]``.
            keep: bool ``[B, H, L]``: which tokens each (row, head) keeps.
            positions: int ``[L]``: logical position of each of the L tokens.
        """
        B, H, L, D = key.shape
        if (B, H, D) != (self.num_rows, self.num_heads, self.head_dim) or keep.shape != (B, H, L):
            raise ValueError(f"fill: shapes {tuple(key.shape)} / {tuple(keep.shape)} do not fit store {self}")
        keep = keep.reshape(B * H, L)
        counts = keep.sum(-1)
        self._allocate(self._capacity_for(counts))
        self.length = counts
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
        """
        B, H, q, D = key.shape
        if (B, H, D) != (self.num_rows, self.num_heads, self.head_dim):
            raise ValueError(f"append: shape {tuple(key.shape)} does not fit store {self}")
        if valid is None:
            valid_s = torch.ones(B * H, q, dtype=torch.bool, device=key.device)
        else:
            valid_s = valid[:, None, :].expand(B, H, q).reshape(B * H, q)
        added = valid_s.sum(-1)
        if bool((self.length + added > self.cap).any()):
            self._grow(self.length + added)
        if q == 1 and valid is None:  # the decode step: one slot per segment, no masking
            dest = self.start + self.length
            self.k[dest] = key.reshape(B * H, D).to(self.dtype)
            self.v[dest] = value.reshape(B * H, D).to(self.dtype)
            self.pos[dest] = positions.to(torch.int32).expand(B * H)
        else:
            dest = (self.start[:, None] + self.length[:, None] + torch.cumsum(valid_s, -1) - 1)[valid_s]
            self.k[dest] = key.reshape(B * H, q, D)[valid_s].to(self.dtype)
            self.v[dest] = value.reshape(B * H, q, D)[valid_s].to(self.dtype)
            self.pos[dest] = positions.to(torch.int32).expand(B * H, q)[valid_s]
        self._reset_slot_buffers(dest)
        self.length = self.length + added

    def _grow(self, needed: torch.Tensor) -> None:
        """Reallocate so every segment has room for ``needed`` tokens (copies the used slots once)."""
        caps = torch.where(needed > self.cap, self._capacity_for(needed, growing=True), self.cap)
        self._relayout(torch.arange(self.num_segments, device=self.device), caps)

    def _relayout(self, source_segments: torch.Tensor, caps: torch.Tensor) -> None:
        """New buffers whose segment i holds a copy of old segment ``source_segments[i]``."""
        old_k, old_v, old_pos = self.k, self.v, self.pos
        old_slot_buffers = dict(self.slot_buffers)
        src = segment_ranges(self.start[source_segments], self.length[source_segments])
        lengths = self.length[source_segments]
        self._allocate(caps)
        self.length = lengths
        dest = segment_ranges(self.start, lengths)
        self.k[dest], self.v[dest], self.pos[dest] = old_k[src], old_v[src], old_pos[src]
        for name, old in old_slot_buffers.items():
            self.slot_buffers[name][dest] = old[src]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder or repeat) batch rows: row i of the result is old row ``rows[i]``."""
        rows = rows.to(self.device, torch.long)
        segs = (rows[:, None] * self.num_heads + torch.arange(self.num_heads, device=self.device)).reshape(-1)
        caps = self.cap[segs]
        self.num_rows = len(rows)
        self._relayout(segs, caps)

    def truncate_positions(self, limit: int) -> None:
        """Drop every stored token whose logical position is >= ``limit`` (tokens are in order)."""
        slots = self.used_slots()
        seg = torch.repeat_interleave(torch.arange(self.num_segments, device=self.device), self.length)
        drop = torch.zeros(self.num_segments, dtype=torch.long, device=self.device)
        drop.index_add_(0, seg, (self.pos[slots] >= limit).long())
        self.length = self.length - drop

    def write_segment_tokens(self, segment: int, slots_from: int, key, value, positions) -> None:
        """Overwrite ``len(positions)`` slots of one segment, starting at its slot ``slots_from``."""
        n = key.shape[0]
        if slots_from + n > int(self.length[segment]):
            raise IndexError("write past the stored length of the segment")
        lo = int(self.start[segment]) + slots_from
        self.k[lo : lo + n], self.v[lo : lo + n] = key.to(self.dtype), value.to(self.dtype)
        self.pos[lo : lo + n] = positions.to(torch.int32)

    # ----------------------------------------------------------------- eviction
    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Evict tokens: keep only the marked tokens of every segment, in their order, packed at the
        front of the segment (capacities and starts do not change; see ``shrink``).

        Freed slots are zeroed (``pos`` -1, slot buffers back to their fill value).

        Args:
            keep: bool ``[B, H, M]`` or ``[S, M]`` aligned with ``padded()``: ``keep[s, i]`` says
                whether the i-th stored token of segment s stays. ``M`` must be at least the longest
                segment; entries at or beyond a segment's length are ignored.

        Returns:
            int64 ``[S]``: tokens evicted per segment.
        """
        S = self.num_segments
        keep = keep.to(self.device).reshape(S, -1)
        M = int(self.length.max()) if S else 0
        if keep.shape[1] < M:
            raise ValueError(f"compact: keep has {keep.shape[1]} columns, the longest segment holds {M}")
        keep = keep[:, :M]
        ar = torch.arange(M, device=self.device)
        inside = ar[None, :] < self.length[:, None]
        keep = keep.bool() & inside
        new_length = keep.sum(-1)
        if S <= _SHIFT_MAX_SEGMENTS and bool((self.length - new_length <= 1).all()):
            return self._drop_one_each(keep, new_length)
        new_index = torch.cumsum(keep.long(), -1) - 1
        src = (self.start[:, None] + ar[None, :])[keep]
        dest = (self.start[:, None] + new_index)[keep]
        moved = src != dest
        src, dest = src[moved], dest[moved]
        if src.numel():
            # Advanced indexing gathers the sources into a new tensor before writing: overlap is safe.
            self.k[dest], self.v[dest], self.pos[dest] = self.k[src], self.v[src], self.pos[src]
            for buf in self.slot_buffers.values():
                buf[dest] = buf[src]
        freed = segment_ranges(self.start + new_length, self.length - new_length)
        if freed.numel():
            self.k[freed] = 0
            self.v[freed] = 0
            self.pos[freed] = -1
            self._reset_slot_buffers(freed)
        evicted = self.length - new_length
        self.length = new_length
        return evicted

    def _drop_one_each(self, keep: torch.Tensor, new_length: torch.Tensor) -> torch.Tensor:
        """``compact`` when no segment loses more than one token (an evicting policy's decode step):
        shift each affected segment's tail left by one slot with contiguous copies instead of
        gathering every kept token through an index, the same result with far less data moved."""
        evicted = self.length - new_length
        segments = evicted.nonzero().flatten()
        if segments.numel():
            dropped = (~keep[segments]).long().argmax(-1)  # first unkept column = the evicted token
            lows = (self.start[segments] + dropped).tolist()
            highs = (self.start[segments] + self.length[segments]).tolist()
            buffers = [(self.k, 0), (self.v, 0), (self.pos, -1)]
            buffers += [(buf, self._slot_fill[name]) for name, buf in self.slot_buffers.items()]
            for lo, hi in zip(lows, highs):
                for buf, fill in buffers:
                    if hi - lo > 1:
                        buf[lo : hi - 1] = buf[lo + 1 : hi].clone()  # overlapping ranges: copy the source first
                    buf[hi - 1] = fill
        self.length = new_length
        return evicted

    def shrink(self) -> None:
        """Give back unused capacity: every segment whose capacity exceeds what a fresh allocation of
        its tokens would reserve is reallocated to that size (one copy of the layer, only if needed)."""
        caps = torch.minimum(self.cap, self._capacity_for(self.length))
        if not torch.equal(caps, self.cap):
            self._relayout(torch.arange(self.num_segments, device=self.device), caps)

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot index of the i-th stored token of every segment, padded to the longest segment.

        Returns:
            ``idx``: int64 ``[S, M]`` (0 where the segment is shorter), ``valid``: bool ``[S, M]``.
            ``self.k[idx]`` is ``padded()``'s keys as ``[S, M, D]``; ``buf[idx]`` reads a slot buffer
            in the same layout.
        """
        M = int(self.length.max()) if self.num_segments else 0
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
        M = int(self.length.max()) if self.num_segments else 0
        ar = torch.arange(M, device=self.device)
        valid = ar[None, :] < self.length[:, None]
        idx = torch.where(valid, self.start[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
        shape = (self.num_rows, self.num_heads, M)
        return (
            self.k[idx].view(*shape, self.head_dim),
            self.v[idx].view(*shape, self.head_dim),
            valid.view(shape),
            self.pos[idx].long().view(shape),
        )

    def segment(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and positions stored by segment ``s`` (views, ``[length, D]``)."""
        lo, n = int(self.start[s]), int(self.length[s])
        return self.k[lo : lo + n], self.v[lo : lo + n], self.pos[lo : lo + n]

    # ----------------------------------------------------------------- accounting
    def bytes_allocated(self) -> int:
        extra = sum(buf.numel() * buf.element_size() for buf in self.slot_buffers.values())
        return self.k.numel() * self.k.element_size() * 2 + self.pos.numel() * self.pos.element_size() + extra

    def bytes_used(self) -> int:
        return int(self.length.sum()) * self.head_dim * self.k.element_size() * 2

    def __repr__(self) -> str:
        return (
            f"RaggedKVStore(rows={self.num_rows}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"stored={int(self.length.sum())}, capacity={self.capacity}, dtype={self.dtype})"
        )

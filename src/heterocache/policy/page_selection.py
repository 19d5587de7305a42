"""Per-step page selection over a full KV cache: the base of a dynamic method that is one page
scoring function.

Every token stays on the device. The stored keys of each (row, KV head) are cut into pages of
``page_size`` slots; per page the channel-wise minimum and maximum key are kept (``PageSummaries``,
updated on the device as tokens are appended). At each decode step a ``PageSelectionPolicy``
scores the pages for the step's query (:meth:`PageSelectionPolicy.page_scores`) and attention reads
only the top pages up to the token budget, the page holding the newest token always among them.
Quest (:mod:`heterocache.methods.quest`) scores a page by the upper bound of its query-key
products; a user's method overrides ``page_scores`` alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..attention.decode import SlotSelection
from ..store.ragged import RaggedKVStore
from .base import Policy, PrefillContext
from .budget import check_budget_spec
from .pages import page_minmax


@dataclass
class PageSelectionPolicy(Policy):
    """Choose, at every decode step, the pages each (row, KV head) attends to.

    Subclasses implement :meth:`page_scores`.

    Args:
        budget: fraction of each segment's stored tokens attended per step, in (0, 1] (default
            0.25); the page count is ``max(min_pages, ceil(budget * tokens / page_size))`` with
            ``tokens`` the longest segment of the layer at that step.
        budget_tokens: an absolute per-step token budget instead; overrides ``budget``.
        page_size: tokens per page (default 16).
        dense_layers: the first layers attend to every token (default 2).
        min_pages: pages attended at least (default 3).
        gqa_reduce: how the query heads of a GQA group choose pages: "max" (default: one page set
            per KV head, ranked by the best of its query heads' scores, so a group's K/V pages are
            read once), "mean" (ranked by their mean) or "none" (a page set per query head).

    When the budget covers every page, the layer attends densely: exactly FullKV's result.
    """

    budget: float | None = 0.25
    budget_tokens: int | None = None
    page_size: int = 16
    dense_layers: int = 2
    min_pages: int = 3
    gqa_reduce: str = "max"
    selects_per_step = True
    # Page extrema cannot be un-done by dropping tokens: crop() is refused, not silently stale.
    croppable = False
    # Keeps every prompt token and reads no prompt query: a bounded prefill is the exact one.
    prompt_queries = 0
    bounded_prefill = True

    def __post_init__(self):
        self.budget, self.budget_tokens = check_budget_spec(self.budget, self.budget_tokens)
        for field in ("page_size", "min_pages"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.gqa_reduce not in ("max", "mean", "none"):
            raise ValueError(f"gqa_reduce must be 'max', 'mean' or 'none', got {self.gqa_reduce!r}")
        self._summaries: dict[int, PageSummaries] = {}

    def page_scores(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """How much the step's queries want each page: float ``[S, G, P]``, higher read first.

        Args:
            q: ``[S, G, D]`` the step's queries, ``S = rows * kv_heads`` segments, ``G`` query heads
                per KV head (after RoPE).
            kmin, kmax: ``[S, P, D]`` float32 channel-wise minimum and maximum key of every page
                (pages beyond a segment's tokens are masked by the caller).

        Must run on the device only (no host reads): it is called at every decode step.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement page_scores(q, kmin, kmax)")

    # ------------------------------------------------------------------ roles and memory
    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        return ["dense" if layer_idx < self.dense_layers else "paged"] * num_heads

    def device_extra_bytes_per_layer(self) -> dict[int, int]:
        return {i: s.nbytes() for i, s in self._summaries.items()}

    def reset(self) -> None:
        self._summaries.clear()

    # ------------------------------------------------------------------ prefill / extend
    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        if layer_idx >= self.dense_layers:
            self._summaries[layer_idx] = PageSummaries.build(store, self.page_size)

    def on_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        if layer_idx >= self.dense_layers:  # a later turn (not a decode step): rebuild from the store
            self._summaries[layer_idx] = PageSummaries.build(store, self.page_size)

    def select_rows(self, rows: torch.Tensor) -> None:
        for summaries in self._summaries.values():
            summaries.select_rows(rows)

    # ------------------------------------------------------------------ decode
    def pages_per_step(self, store: RaggedKVStore) -> int:
        """Pages each segment of the layer reads at this step (host values only)."""
        longest = store.max_length()
        tokens = self.budget_tokens if self.budget_tokens is not None else math.ceil(self.budget * longest)
        return max(self.min_pages, -(-tokens // self.page_size))

    def decode_selection(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float):
        summaries = self._summaries.get(layer_idx)
        if summaries is None:
            return None
        summaries.update(store)  # the token just appended
        k = self.pages_per_step(store)
        longest = store.max_length()
        if k * self.page_size >= longest:
            return None  # the budget covers every page: dense, exactly FullKV
        B, Hq, _, D = query.shape
        q = query.reshape(store.num_segments, Hq // store.num_heads, D)
        raw = self.page_scores(q, summaries.kmin, summaries.kmax)
        scores = summaries.mask(raw, store, self.gqa_reduce)  # [S, P] or [S, G, P]; +inf: the newest page
        k = min(k, scores.shape[-1])
        pages = scores.topk(k, dim=-1).indices  # [S, k] or [S, G, k]
        chosen_valid = scores.gather(-1, pages) > float("-inf")
        return summaries.slots_of(pages, chosen_valid, store)


class PageSummaries:
    """Channel-wise key minimum and maximum of every page of a layer's segments (device).

    ``kmin``/``kmax``: ``[S, P, D]`` float32 with ``P`` covering the segments' capacity; page ``p``
    of segment ``s`` holds the segment's stored tokens ``p * page_size .. (p + 1) * page_size - 1``
    (the store keeps a segment's tokens in order from its first slot).
    """

    def __init__(self, kmin: torch.Tensor, kmax: torch.Tensor, page_size: int, num_heads: int, layout_version: int):
        self.kmin, self.kmax, self.page_size, self.layout_version = kmin, kmax, page_size, layout_version
        self.num_heads = num_heads

    @classmethod
    def build(cls, store: RaggedKVStore, page_size: int) -> "PageSummaries":
        """From the store's tokens (prefill or a later turn: not a decode step)."""
        pages = cls._page_capacity(store, page_size)
        j = np.arange(pages * page_size)
        idx = np.minimum(store.start_h[:, None] + j[None, :], store.k.shape[0] - 1)
        valid = j[None, :] < store.length_h[:, None]
        idx_d = torch.from_numpy(idx).to(store.device)
        valid_d = torch.from_numpy(valid).to(store.device)
        kmin, kmax = page_minmax(store.k[idx_d], valid_d, page_size)  # [S, pages, D]
        return cls(kmin, kmax, page_size, store.num_heads, store.layout_version)

    @staticmethod
    def _page_capacity(store: RaggedKVStore, page_size: int) -> int:
        return max(1, -(-int(store.cap_h.max()) // page_size))

    def nbytes(self) -> int:
        return self.kmin.numel() * self.kmin.element_size() * 2

    def select_rows(self, rows: torch.Tensor) -> None:
        """Reorder or repeat whole rows (segments are row-major: ``s = row * H + head``)."""
        S, P, D = self.kmin.shape
        rows = torch.as_tensor(rows, device=self.kmin.device)
        self.kmin = self.kmin.view(-1, self.num_heads, P, D)[rows].reshape(-1, P, D)
        self.kmax = self.kmax.view(-1, self.num_heads, P, D)[rows].reshape(-1, P, D)

    def update(self, store: RaggedKVStore) -> None:
        """Fold the token each segment just appended into its page (device ops only; a first token
        opens its page). Grows the summaries when the store's capacities grew (host values)."""
        if store.layout_version != self.layout_version:
            pages = self._page_capacity(store, self.page_size)
            extra = pages - self.kmin.shape[1]
            if extra > 0:
                pad = self.kmin.new_zeros(self.kmin.shape[0], extra, self.kmin.shape[2])
                self.kmin, self.kmax = torch.cat([self.kmin, pad], 1), torch.cat([self.kmax, pad.clone()], 1)
            self.layout_version = store.layout_version
        last = store.length - 1  # [S] device: the new token's place in its segment
        page = last // self.page_size
        opens = (last % self.page_size == 0)[:, None]
        key = store.k[store.start + last].float()  # [S, D]
        ar = torch.arange(key.shape[0], device=key.device)
        self.kmin[ar, page] = torch.where(opens, key, torch.minimum(self.kmin[ar, page], key))
        self.kmax[ar, page] = torch.where(opens, key, torch.maximum(self.kmax[ar, page], key))

    def mask(self, s: torch.Tensor, store: RaggedKVStore, gqa_reduce: str) -> torch.Tensor:
        """Page scores ``s [S, G, P]`` reduced over the group (``[S, P]``, or kept per query head
        with "none"): ``-inf`` for pages beyond a segment's tokens, ``+inf`` for the page holding
        its newest token (always read)."""
        if gqa_reduce == "none":
            extra = (slice(None), None, None)  # keep the query-head axis: [S, G, P]
        else:
            s = s.amax(1) if gqa_reduce == "max" else s.mean(1)  # [S, P]
            extra = (slice(None), None)
        used = (store.length + self.page_size - 1) // self.page_size  # pages holding tokens
        p = torch.arange(s.shape[-1], device=s.device)
        s = s.masked_fill(p >= used[extra], float("-inf"))
        return s.masked_fill(p == (used - 1)[extra], float("inf"))

    def slots_of(self, pages: torch.Tensor, chosen_valid: torch.Tensor, store: RaggedKVStore) -> SlotSelection:
        """The slots of the chosen pages ``[S, k]`` (or ``[S, G, k]``, per query head): a
        ``SlotSelection`` of ``[S, k * page_size]`` (or ``[S * G, k * page_size]``)."""
        k = pages.shape[-1]
        lead = (slice(None),) + (None,) * (pages.dim() - 1)  # broadcast [S] over the other axes
        within = pages[..., None] * self.page_size + torch.arange(self.page_size, device=pages.device)
        valid = chosen_valid[..., None] & (within < store.length[lead + (None,)])
        slots = torch.where(valid, store.start[lead + (None,)] + within, torch.zeros_like(within))
        rows = pages.numel() // k
        return SlotSelection(slots.reshape(rows, k * self.page_size), valid.reshape(rows, k * self.page_size))

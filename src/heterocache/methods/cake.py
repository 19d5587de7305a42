"""CAKE (Qin et al., ICLR 2025, "Cake: Cascading and Adaptive KV Cache Eviction with Layer
Preferences")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.registry import register_method
from ..policy.base import PrefillContext
from ..policy.budget import allocate_proportional, round_preserving_sum
from ..policy.budgeted import BudgetedPolicy, LayerState, evict_to_limit, num_layers_of, per_segment
from ..policy.scoring import pool_scores, reduce_gqa, stored_attention, topk_keep, window_attention_stats
from ..policy.window_selection import check_window_scoring
from ..store.ragged import RaggedKVStore

SCORE_BUFFER = "cake.indicator"


@register_method(
    "cake",
    description="layer budgets from attention dispersion and shift, cascading eviction (Qin et al. 2025)",
    paper="https://arxiv.org/abs/2503.12491",
)
@dataclass
class CAKEPolicy(BudgetedPolicy):
    """Layer budgets from each layer's attention preference, allocated in a cascade during prefill.

    For each layer, from the attention ``A`` of the last ``window`` prompt queries over the earlier
    prompt tokens (computed in key chunks, no eager attention):

    - spatial dispersion ``H = -sum A log A`` and temporal shift ``V = sum_j Var_i A[i, j]``
      (summed over query heads, window queries ``i`` and earlier tokens ``j``; unbiased variance over
      the window queries), and the layer preference ``P = H^(1/tau1) * V^(1/tau2)``;
    - the eviction indicator of each token ``mean_i A[i, j] + gamma * Var_i A[i, j]``, average-pooled
      along the sequence and averaged over a GQA group.

    Budget: the model's total ``m * k`` tokens per head (``k`` the uniform budget, ``m`` full-attention layers) minus
    the window that every layer keeps is split among layers in proportion to their preference, no
    layer above its prompt (what a capped layer cannot take goes to the others). Cascade: after layer
    ``l`` is prefilled the total is re-split among layers ``0..l`` and the earlier layers are evicted
    down to their new budgets (lowest indicator first; the result is the same as splitting once at
    the end, but memory never exceeds the total). While decoding (``evict_during_decode``) each layer
    stays at its budget: the new query's attention over the stored tokens outside the recent window,
    pooled, decides which token goes (as in the reference code's decoding eviction).

    Preferences and budgets are per batch row (the reference sums over the batch), so each row of a
    padded batch is compressed as it would be alone.

    Defaults: ``window=32``, ``gamma=200`` and average pooling with kernel 5 are the paper's and the
    reference code's. ``tau1`` and ``tau2`` are tuned per model and budget in the paper (e.g. 1.6 and
    0.4 for Llama-3.1-8B at 1024 tokens in the reference configuration); 1.0 and 1.0 are the
    reference code's defaults for models it has no tuned values for, and ours.

    Args:
        budget: fraction of the prompt KV kept on average per head, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; average prompt tokens per head, overrides ``budget``.
        window: observation window (last prompt queries), always kept. Default 32.
        kernel: pooling kernel of the indicator (odd). Default 5.
        pooling: "avg" (default) or "max".
        gqa_reduce: "mean" (default) or "max" over a GQA group.
        tau1, tau2: temperatures of dispersion and shift in the preference (> 0). Default 1.0, 1.0.
        gamma: weight of the variance in the indicator (>= 0). Default 200.
        cascade: evict earlier layers as each layer is prefilled (default True); False keeps whole
            prompts until the last layer and then evicts every layer (same result, more memory).
        evict_during_decode: keep every layer at its budget while decoding (default True).
    """

    budget: float | None = 0.25
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa_reduce: str = "mean"
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0
    cascade: bool = True
    evict_during_decode: bool = True

    @property
    def prompt_queries(self) -> int:
        """The observation window: the last prompt queries the statistics read."""
        return self.window

    def __post_init__(self):
        super().__post_init__()
        check_window_scoring(self)
        for name in ("tau1", "tau2"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not float(self.gamma) >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")
        for name in ("cascade", "evict_during_decode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._decode = LayerState()
        self._clear_prefill()

    def _clear_prefill(self) -> None:
        self._prefs: list[torch.Tensor] = []  # float64 [B] per prefilled layer
        self._alloc: torch.Tensor | None = None  # int64 [B, l]: tokens beyond the window per layer
        self._stores: dict[int, RaggedKVStore] = {}
        self._pending: tuple | None = None
        self._final: torch.Tensor | None = None

    @property
    def croppable(self) -> bool:
        return not self.evict_during_decode

    # ------------------------------------------------------------------ prefill
    def _split(self, ctx: PrefillContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: window kept by every layer ``w``, tokens beyond it per layer on average ``c``, and
        the most a layer can keep beyond it ``cap`` (int64 ``[B]`` each)."""
        k = self.head_tokens(ctx)
        w = torch.clamp(k, max=self.window)
        return w, k - w, ctx.prompt_tokens - w

    def preference_and_indicator(self, ctx: PrefillContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's preference per row (float64 ``[B]``) and the indicator of every prompt token
        per KV head (float32 ``[B, H, L]``, 0 outside the earlier tokens)."""
        B, H, L, _ = ctx.key.shape
        total, squares, entropy = window_attention_stats(ctx.query, ctx.key, ctx.valid, self.window, ctx.scaling)
        n = ctx.prompt_tokens
        ws = torch.clamp(n, max=self.window)  # window queries of each row (all real: left padding)
        from_end = torch.flip(torch.cumsum(torch.flip(ctx.valid.long(), [-1]), -1), [-1])
        earlier = ctx.valid & (from_end > ws[:, None])  # [B, L] tokens before the window
        wq = ws.clamp_min(1).double()[:, None, None]
        mean = total.double() / wq
        var = ((squares.double() - total.double() ** 2 / wq) / (wq - 1).clamp_min(1)).clamp_min(0.0)
        var = torch.where(ws[:, None, None] > 1, var, torch.zeros_like(var))
        mask = earlier[:, None, :]
        dispersion = torch.where(mask, entropy.double(), 0.0).sum((1, 2))
        shift = torch.where(mask, var, 0.0).sum((1, 2))
        if self.kv_shard is not None and self.kv_shard.sharded:
            # The sums run over the layer's query heads; under tensor parallelism this process
            # holds a slice of them: sum the slices so every rank has the whole layer's statistics
            # (and so the same budgets). One all-reduce of 2 x B float64 per layer, at prefill.
            both = self.kv_shard.all_reduce_sum_(torch.stack([dispersion, shift]))
            dispersion, shift = both[0], both[1]
        preference = dispersion ** (1.0 / float(self.tau1)) * shift ** (1.0 / float(self.tau2))
        indicator = torch.where(mask, mean + float(self.gamma) * var, 0.0).float()
        indicator = reduce_gqa(pool_scores(indicator, self.kernel, self.pooling), H, self.gqa_reduce)
        return preference, indicator * earlier[:, None, :]

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        B, H = ctx.key.shape[:2]
        layer = ctx.layer_idx
        m = num_layers_of(ctx, "CAKE")
        if layer == 0:
            self._clear_prefill()
            self._decode.clear()
        if layer != len(self._prefs):
            raise RuntimeError(
                f"CAKE expects layers to be prefilled in order; got layer {layer} after {len(self._prefs)}"
            )
        preference, indicator = self.preference_and_indicator(ctx)
        # Layer budgets are split on the host (prefill: reads are fine): the layers' statistics may
        # come from different devices (device_map), and a budget is a host decision anyway.
        self._prefs.append(preference.cpu())
        w, c, cap = (t.cpu() for t in self._split(ctx))
        if self.cascade or layer == m - 1:
            alloc = self._allocate(m * c, torch.stack(self._prefs, -1), cap)
        else:  # not cascading: every layer keeps its whole prompt until the last one is prefilled
            alloc = cap[:, None] if self._alloc is None else torch.cat([self._alloc, cap[:, None]], -1)
        self._alloc = alloc
        self._pending = (ctx, indicator, w)
        return per_segment(w + alloc[:, layer], H).to(ctx.key.device)

    def _allocate(self, total: torch.Tensor, prefs: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        """Integer budgets beyond the window for layers ``0..l``: the total split by preference with
        caps; earlier layers never grow (they may already be evicted), what they cannot take goes to
        the newest layer (up to its cap)."""
        shares = allocate_proportional(total, prefs, cap)
        alloc = round_preserving_sum(shares, cap[:, None].expand_as(shares))
        if self._alloc is not None:
            earlier = torch.minimum(alloc[:, :-1], self._alloc)
            deficit = (alloc[:, :-1] - earlier).sum(-1)
            newest = torch.minimum(alloc[:, -1] + deficit, cap)
            alloc = torch.cat([earlier, newest[:, None]], -1)
        return alloc

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if pending is None or pending[0] is not ctx:
            raise RuntimeError("CAKEPolicy.select must follow plan() for the same layer")
        _, indicator, w = pending
        keep = topk_keep(indicator, ctx.valid, plan, protect_last=w)
        self._pending = (ctx, indicator, w, keep)
        return keep

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not ctx or len(pending) != 4:
            return
        _, indicator, w, keep = pending
        B, H, L = indicator.shape
        last = layer_idx == num_layers_of(ctx, "CAKE") - 1
        if not last:  # later stages may evict this layer: keep the indicator next to its tokens
            buffer = store.add_slot_buffer(SCORE_BUFFER)
            # fill() stores the kept tokens segment after segment in their order: used_slots() order.
            buffer[store.used_slots()] = indicator.reshape(B * H, L)[keep.reshape(B * H, L)]
        self._stores[layer_idx] = store
        protect = per_segment(w, H)
        for j, earlier in self._stores.items():
            limit = per_segment(w + self._alloc[:, j], H)  # host: each layer's store on its own device
            if j != layer_idx and bool((torch.from_numpy(earlier.lengths_host()) > limit).any()):
                idx, _ = earlier.padded_index()
                evict_to_limit(earlier, limit, earlier.slot_buffer(SCORE_BUFFER)[idx], protect_last=protect)
                earlier.shrink()
        if last:
            for j, earlier in self._stores.items():
                earlier.remove_slot_buffer(SCORE_BUFFER)
                if self.evict_during_decode:
                    self._decode.set(j, earlier.device, H, limit=per_segment(w + self._alloc[:, j], H), window=protect)
            self._final = self._alloc
            self._stores = {}

    def layer_budgets(self) -> torch.Tensor | None:
        """Tokens beyond the window per layer of the last prefilled prompt: int64 ``[B, m]`` (None
        before a prompt was fully prefilled). Every layer keeps these plus the window."""
        return self._final

    # ------------------------------------------------------------------ decode
    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._decode.get(layer_idx)
        if state is None or not (store.length_h > state["limit"].h).any():  # host mirrors: no read
            return
        probs = stored_attention(store, query, scaling)  # [capacity, G]
        idx, valid = store.padded_index()
        S, M = idx.shape
        window = state["window"].d
        candidate = valid & (torch.arange(M, device=idx.device)[None, :] < (store.length - window)[:, None])
        scores = torch.where(candidate[:, :, None], probs[idx], 0.0).permute(0, 2, 1)  # [S, G, M]
        scores = pool_scores(scores, self.kernel, self.pooling)
        scores = scores.mean(1) if self.gqa_reduce == "mean" else scores.amax(1)
        evict_to_limit(store, state["limit"], scores, protect_last=state["window"])

    def select_rows(self, rows: torch.Tensor) -> None:
        self._decode.select_rows(rows)
        if self._final is not None:
            self._final = self._final[rows.to(self._final.device, torch.long)]

    def reset(self) -> None:
        self._decode.clear()
        self._clear_prefill()


CAKECache = CAKEPolicy.cache_class

"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.registry import register_method
from ..policy.base import PrefillContext
from ..policy.budgeted import BudgetedPolicy, LayerState, evict_to_limit
from ..store.ragged import RaggedKVStore


@register_method(
    "streamingllm",
    description="attention sinks + recent window, sliding while decoding (Xiao et al. 2023)",
    paper="https://arxiv.org/abs/2309.17453",
)
@dataclass
class StreamingLLMPolicy(BudgetedPolicy):
    """Keep the first ``sinks`` tokens (attention sinks) and a window of the most recent ones.

    Every KV head keeps ``k = round(budget * prompt_tokens)`` prompt tokens (or
    ``min(budget_tokens, prompt_tokens)``): the first ``min(sinks, k - 1)`` real tokens and the last
    ``k - sinks`` ones. By default (``evict_during_decode=True``, the paper's rolling cache) the
    window keeps sliding while decoding: each new token evicts the oldest non-sink token, so every
    head holds exactly ``k`` tokens at every step. ``evict_during_decode=False`` compresses the prompt
    only and appends every decoded token (the setting of LongBench-style comparisons, e.g.
    KVCache-Factory and kvpress).

    Deviation from the paper: keys are cached after RoPE at their original positions (as in kvpress
    and KVCache-Factory), not re-rotated to their positions inside the cache.

    Args:
        budget: fraction of the prompt KV kept, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; prompt tokens kept per head, overrides ``budget`` (default None).
        sinks: initial tokens always kept. Default 4 (paper).
        evict_during_decode: slide the window while decoding (default True, the paper's algorithm).
    """

    budget: float | None = 0.25
    sinks: int = 4
    evict_during_decode: bool = True
    prompt_queries = 0
    bounded_prefill = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.evict_during_decode, bool):
            raise TypeError(f"evict_during_decode must be True or False, got {self.evict_during_decode!r}")
        self._state = LayerState()

    @property
    def croppable(self) -> bool:
        return not self.evict_during_decode

    def sink_tokens(self, plan: torch.Tensor) -> torch.Tensor:
        """Sinks kept by a head that keeps ``plan`` tokens: ``min(sinks, plan - 1)`` (at least one
        recent token stays, the newest one)."""
        return torch.clamp(torch.minimum(torch.full_like(plan, self.sinks), plan - 1), min=0)

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        B, H = ctx.key.shape[:2]
        return self.head_tokens(ctx)[:, None].expand(B, H).clone()

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        valid = ctx.key_valid
        valid = valid[:, None, :] if valid.dim() == 2 else valid  # [B, 1 or H, L]
        from_start = torch.cumsum(valid.long(), -1)  # 1 = first real token
        from_end = torch.flip(torch.cumsum(torch.flip(valid.long(), [-1]), -1), [-1])  # 1 = last real token
        sinks = self.sink_tokens(plan)
        recent = plan - sinks
        keep = (from_start <= sinks[:, :, None]) | (from_end <= recent[:, :, None])
        return keep & valid

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        if layer_idx == 0:
            self._state.clear()
        if self.evict_during_decode:
            limit = torch.from_numpy(store.lengths_host())
            self._state.set(layer_idx, store.device, store.num_heads, limit=limit, sinks=self.sink_tokens(limit))

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._state.get(layer_idx)
        if state is not None:
            evict_to_limit(store, state["limit"], protect_first=state["sinks"])

    def select_rows(self, rows: torch.Tensor) -> None:
        self._state.select_rows(rows)

    def reset(self) -> None:
        self._state.clear()


StreamingLLMCache = StreamingLLMPolicy.cache_class

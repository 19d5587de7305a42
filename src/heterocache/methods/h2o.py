"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.registry import register_method
from ..policy.base import PrefillContext
from ..policy.budgeted import BudgetedPolicy, LayerState, evict_to_limit
from ..policy.scoring import accumulated_attention, reduce_gqa, stored_attention, topk_keep
from ..store.ragged import RaggedKVStore

SCORE_BUFFER = "h2o.accumulated_attention"


@register_method(
    "h2o",
    description="heavy hitters by accumulated attention + recent tokens, evicting while decoding (Zhang et al. 2023)",
    paper="https://arxiv.org/abs/2306.14048",
)
@dataclass
class H2OPolicy(BudgetedPolicy):
    """Keep heavy hitters (tokens with the largest accumulated attention) and the recent tokens.

    Every KV head keeps ``k = round(budget * prompt_tokens)`` tokens (or
    ``min(budget_tokens, prompt_tokens)``): the ``r = round(recent_ratio * k)`` most recent ones and
    the ``k - r`` others with the largest accumulated attention, i.e. the column sums of the causal
    attention of all prompt queries (computed in chunks of queries, never the ``L x L`` matrix;
    a GQA group's query heads are averaged per KV head).

    ``evict_during_decode=True`` (default) is the paper's algorithm: at each decode step the new
    query's attention over the head's stored tokens is added to their scores and, the head being one
    token over its budget, the lowest-scoring token outside the recent window is evicted; every head
    holds exactly ``k`` tokens after every step. It is the default because it is H2O as published
    (a fixed-size cache during generation), the method the paper evaluates. ``False`` is the
    prefill-only variant used in LongBench comparisons (KVCache-Factory, kvpress): the prompt is
    compressed once and decoded tokens are appended, never evicted.

    Accumulated scores live in a per-slot buffer of the store (``RaggedKVStore.add_slot_buffer``),
    which moves them with their tokens on reallocation, row selection and eviction. Tokens appended
    without a decode step (a later turn's prompt) start with a score of 0.

    Args:
        budget: fraction of the prompt KV kept, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; prompt tokens kept per head, overrides ``budget`` (default None).
        recent_ratio: share of each head's budget given to the most recent tokens, in [0, 1].
            Default 0.5 (the paper's equal heavy-hitter and recent budgets).
        evict_during_decode: evict back to the budget at every decode step (default True).
        gqa_reduce: "mean" (default; the same ranking as the sum) or "max" over a GQA group.
    """

    budget: float | None = 0.25
    recent_ratio: float = 0.5
    evict_during_decode: bool = True
    gqa_reduce: str = "mean"
    # Its scores need every prompt query: accumulated piece by piece (observe_prompt_piece).
    prompt_queries = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.recent_ratio, bool) or not (0.0 <= float(self.recent_ratio) <= 1.0):
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio!r}")
        if not isinstance(self.evict_during_decode, bool):
            raise TypeError(f"evict_during_decode must be True or False, got {self.evict_during_decode!r}")
        if self.gqa_reduce not in ("mean", "max"):
            raise ValueError(f"gqa_reduce must be 'mean' or 'max', got {self.gqa_reduce!r}")
        self._state = LayerState()
        self._pending: tuple | None = None
        self._observed: dict[int, torch.Tensor] = {}  # layer -> accumulated scores [B, Hq, n] of the open prompt

    @property
    def croppable(self) -> bool:
        return not self.evict_during_decode

    def recent_tokens(self, plan: torch.Tensor) -> torch.Tensor:
        """Recent tokens of a head that keeps ``plan`` tokens: ``round(recent_ratio * plan)``."""
        return torch.minimum(torch.floor(self.recent_ratio * plan.double() + 0.5).long(), plan)

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        B, H = ctx.key.shape[:2]
        return self.head_tokens(ctx)[:, None].expand(B, H).clone()

    def observe_prompt_piece(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor,
                             scaling: float) -> None:
        """Add the piece's queries' attention to the layer's accumulated scores (the column sums
        ``token_scores`` reads): over the pieces, the sum of every prompt query's."""
        n, q = key.shape[2], query.shape[2]
        scores = accumulated_attention(query, key, valid, scaling)  # [B, Hq, n]
        if q < n:
            earlier = self._observed.get(layer_idx)
            if earlier is None or earlier.shape[-1] != n - q:
                raise RuntimeError(f"H2O: layer {layer_idx} got a prompt piece without the pieces before it")
            scores[..., : n - q] += earlier
        self._observed[layer_idx] = scores

    def token_scores(self, ctx: PrefillContext) -> torch.Tensor:
        """Accumulated attention of every prompt token per KV head: float32 ``[B, H, L]`` (from
        ``observe_prompt_piece``, or from ``ctx.query`` when it holds every prompt query)."""
        scores = self._observed.get(ctx.layer_idx)
        if scores is None or scores.shape[-1] != ctx.key.shape[2]:
            if ctx.query.shape[2] != ctx.key.shape[2]:
                raise ValueError("H2O scores a prompt with every one of its queries: the context holds "
                                 f"{ctx.query.shape[2]} of {ctx.key.shape[2]} and no piece was observed")
            scores = accumulated_attention(ctx.query, ctx.key, ctx.valid, ctx.scaling)
        return reduce_gqa(scores, ctx.key.shape[1], self.gqa_reduce)

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        scores = self.token_scores(ctx)
        self._observed.pop(ctx.layer_idx, None)
        keep = topk_keep(scores, ctx.valid, plan, protect_last=self.recent_tokens(plan))
        self._pending = (ctx, scores, keep) if self.evict_during_decode else None
        return keep

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        if layer_idx == 0:
            self._state.clear()
        pending, self._pending = self._pending, None
        if not self.evict_during_decode or pending is None or pending[0] is not ctx:
            return
        _, scores, keep = pending
        S, L = store.num_segments, scores.shape[-1]
        buffer = store.add_slot_buffer(SCORE_BUFFER)
        # fill() stores the kept tokens segment after segment in their order: used_slots() order.
        buffer[store.used_slots()] = scores.reshape(S, L)[keep.reshape(S, L)]
        limit = torch.from_numpy(store.lengths_host())
        self._state.set(layer_idx, store.device, store.num_heads, limit=limit, recent=self.recent_tokens(limit))

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._state.get(layer_idx)
        if state is None:
            return
        probs = stored_attention(store, query, scaling)  # [capacity, G]
        probs = probs.mean(-1) if self.gqa_reduce == "mean" else probs.amax(-1)
        buffer = store.slot_buffer(SCORE_BUFFER)
        buffer += probs
        idx, _ = store.padded_index()
        evict_to_limit(store, state["limit"], buffer[idx], protect_last=state["recent"])

    def select_rows(self, rows: torch.Tensor) -> None:
        self._state.select_rows(rows)
        for layer_idx, scores in self._observed.items():
            self._observed[layer_idx] = scores[torch.as_tensor(rows, device=scores.device).long()]

    def reset(self) -> None:
        self._state.clear()
        self._pending = None
        self._observed.clear()


H2OCache = H2OPolicy.cache_class

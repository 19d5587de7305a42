"""What every compressing policy shares: its budget fields, per-head token counts, and the
per-(row, head) state that methods evicting while decoding keep between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..budget import check_budget_spec, tokens_for_budget
from ..store import RaggedKVStore
from .base import Policy, PrefillContext


@dataclass
class BudgetedPolicy(Policy):
    """Base class of the policies that keep a budget of the prompt (see ``heterocache.budget``).

    Args:
        budget: fraction of the prompt KV kept, in (0, 1]. Default 0.25.
        budget_tokens: keyword-only; prompt tokens kept per head (on average over layers for methods
            with per-layer budgets). Overrides ``budget`` when set. Default None.
    """

    budget: float | None = 0.25
    budget_tokens: int | None = field(default=None, kw_only=True)

    def __post_init__(self):
        self.budget, self.budget_tokens = check_budget_spec(self.budget, self.budget_tokens)

    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        return ["compressed"] * num_heads

    def head_tokens(self, ctx: PrefillContext) -> torch.Tensor:
        """Prompt tokens one KV head keeps (the uniform budget): int64 ``[B]``."""
        return tokens_for_budget(self.budget, ctx.prompt_tokens, budget_tokens=self.budget_tokens)


def num_layers_of(ctx: PrefillContext, method: str) -> int:
    """The model's layer count, which per-layer budget schedules need.

    Raises:
        ValueError: the attention module did not say (its config has no ``num_hidden_layers``).
    """
    if not ctx.num_layers:
        raise ValueError(
            f"{method} gives every layer its own budget and needs the model's layer count, but the "
            "attention module has no config.num_hidden_layers"
        )
    return int(ctx.num_layers)


class LayerState:
    """Per-layer int64 ``[B, H]`` tensors (token limits, protected counts) that follow the batch rows.

    ``select_rows`` reorders or repeats the rows of every tensor (beam search, batch expansion), as
    the store does with its segments.
    """

    def __init__(self):
        self._layers: dict[int, dict[str, torch.Tensor]] = {}

    def set(self, layer_idx: int, **tensors: torch.Tensor) -> None:
        self._layers.setdefault(layer_idx, {}).update(tensors)

    def get(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return self._layers.get(layer_idx)

    def select_rows(self, rows: torch.Tensor) -> None:
        for tensors in self._layers.values():
            for name, t in tensors.items():
                tensors[name] = t[rows.to(t.device, torch.long)]

    def clear(self) -> None:
        self._layers.clear()

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self._layers


def evict_to_limit(
    store: RaggedKVStore,
    limit: torch.Tensor,
    scores: torch.Tensor | None = None,
    protect_first: torch.Tensor | None = None,
    protect_last: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evict tokens from every segment holding more than its limit, keeping order.

    Each segment over its limit loses exactly ``length - limit`` tokens: the lowest-scoring ones
    among those not protected (or, without scores, the oldest unprotected ones). Protected tokens are
    the first ``protect_first`` (attention sinks) and the last ``protect_last`` (recent window) of the
    segment; the recent window is shortened when sinks and window would not leave room for the
    eviction.

    Args:
        store: the layer's store.
        limit: int64 ``[B, H]`` or ``[S]``: tokens a segment may hold.
        scores: float ``[S, M]`` aligned with ``store.padded_index()`` (M = longest segment); lower is
            evicted first. None: evict the oldest unprotected tokens.
        protect_first, protect_last: int64 ``[B, H]`` or ``[S]`` or None (0).

    Returns:
        int64 ``[S]``: tokens evicted per segment.
    """
    S = store.num_segments
    length = store.length
    limit = limit.reshape(S).to(length.device)
    excess = (length - limit).clamp_min(0)
    if not bool((excess > 0).any()):
        return torch.zeros_like(excess)
    M = int(length.max())
    zero = torch.zeros_like(length)
    first = zero if protect_first is None else protect_first.reshape(S).to(length.device)
    last = zero if protect_last is None else protect_last.reshape(S).to(length.device)
    last = torch.minimum(last, (limit - first).clamp_min(0))
    ar = torch.arange(M, device=length.device)
    candidate = (ar[None, :] >= first[:, None]) & (ar[None, :] < (length - last)[:, None])
    key = ar[None, :].expand(S, M).double() if scores is None else scores[:, :M].double()
    key = key.masked_fill(~candidate, float("inf"))
    kmax = int(excess.max())
    idx = key.topk(kmax, dim=-1, largest=False).indices  # [S, kmax], lowest first
    drop = torch.zeros(S, M, dtype=torch.bool, device=length.device)
    drop.scatter_(-1, idx, torch.arange(kmax, device=length.device)[None, :] < excess[:, None])
    return store.compact(~drop)


def per_segment(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-row ``[B]`` values repeated for every head: ``[B, H]`` (``[B, H]`` passes through)."""
    if values.dim() == 1:
        return values[:, None].expand(-1, num_heads).clone()
    return values

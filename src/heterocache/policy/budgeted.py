"""What every compressing policy shares: its budget fields, per-head token counts, and the
per-(row, head) state that methods evicting while decoding keep between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..store.ragged import RaggedKVStore, to_device
from .base import Policy, PrefillContext
from .budget import check_budget_spec, tokens_for_budget


@dataclass
class BudgetedPolicy(Policy):
    """Base class of the policies that keep a budget of the prompt (see ``heterocache.policy.budget``).

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


class HostDevice:
    """An int64 per-segment value kept twice: ``h`` (NumPy, what the host decides with) and ``d``
    (the device tensor masks are built from). Set at prefill, read every decode step."""

    def __init__(self, host, device: torch.device):
        self.h = np.asarray(host, np.int64).reshape(-1).copy()
        self.d = to_device(self.h, device)

    @classmethod
    def of(cls, values, device: torch.device) -> "HostDevice":
        """From a tensor (read once: prefill time), a NumPy array or a ``HostDevice``."""
        if isinstance(values, HostDevice):
            return values
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        return cls(values, device)

    def rows(self, rows: np.ndarray, num_heads: int) -> "HostDevice":
        """The values of batch rows ``rows`` (reordered or repeated), ``num_heads`` per row."""
        return HostDevice(self.h.reshape(-1, num_heads)[rows].reshape(-1), self.d.device)


class LayerState:
    """Per-layer per-segment values (token limits, protected counts) that follow the batch rows.

    Each value is a ``HostDevice`` (``[B * H]`` on host and device); ``select_rows`` reorders or
    repeats the rows of every value (beam search, batch expansion), as the store does with its
    segments.
    """

    def __init__(self):
        self._layers: dict[int, dict[str, HostDevice]] = {}
        self._heads: dict[int, int] = {}

    def set(self, layer_idx: int, device: torch.device, num_heads: int, **values) -> None:
        """Store values (tensors are read to the host once: call at prefill, not per step)."""
        self._heads[layer_idx] = num_heads
        self._layers.setdefault(layer_idx, {}).update({k: HostDevice.of(v, device) for k, v in values.items()})

    def get(self, layer_idx: int) -> dict[str, HostDevice] | None:
        return self._layers.get(layer_idx)

    def select_rows(self, rows) -> None:
        rows = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        for layer_idx, values in self._layers.items():
            for name, v in values.items():
                values[name] = v.rows(rows, self._heads[layer_idx])

    def clear(self) -> None:
        self._layers.clear()
        self._heads.clear()

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self._layers


def evict_to_limit(
    store: RaggedKVStore,
    limit,
    scores: torch.Tensor | None = None,
    protect_first=None,
    protect_last=None,
) -> np.ndarray:
    """Evict tokens from every segment holding more than its limit, keeping order.

    Each segment over its limit loses exactly ``length - limit`` tokens: the lowest-scoring ones
    among those not protected (or, without scores, the oldest unprotected ones). Protected tokens are
    the first ``protect_first`` (attention sinks) and the last ``protect_last`` (recent window) of the
    segment; the recent window is shortened when sinks and window would not leave room for the
    eviction.

    How many tokens go is a host decision (the store's length mirror against the host limit), so
    the decode step's case, at most one token per segment, never reads the device
    (``RaggedKVStore.drop_one``); larger evictions (after a later turn) take ``compact``.

    Args:
        store: the layer's store.
        limit: per-segment limit ``[B, H]`` / ``[S]``: a ``HostDevice`` (no read), a NumPy array or
            a tensor (read once).
        scores: float ``[S, M]`` aligned with ``store.padded_index()`` (M = longest segment); lower is
            evicted first. None: evict the oldest unprotected tokens.
        protect_first, protect_last: like ``limit``, or None (0).

    Returns:
        int64 ``[S]`` NumPy: tokens evicted per segment.
    """
    S, dev = store.num_segments, store.device
    limit = HostDevice.of(limit, dev)
    excess = np.maximum(store.length_h - limit.h, 0)
    if not excess.any():
        return excess
    M = store.max_length()
    length = store.length
    zero = torch.zeros_like(length)
    first = zero if protect_first is None else HostDevice.of(protect_first, dev).d
    last = zero if protect_last is None else HostDevice.of(protect_last, dev).d
    last = torch.minimum(last, (limit.d - first).clamp_min(0))
    ar = torch.arange(M, device=dev)
    candidate = (ar[None, :] >= first[:, None]) & (ar[None, :] < (length - last)[:, None])
    key = ar[None, :].expand(S, M).double() if scores is None else scores[:, :M].double()
    key = key.masked_fill(~candidate, float("inf"))
    kmax = int(excess.max())
    if kmax == 1 and (store.cap_h > 0).all():
        store.drop_one(key.argmin(-1), excess > 0)
        return excess
    idx = key.topk(kmax, dim=-1, largest=False).indices  # [S, kmax], lowest first
    drop = torch.zeros(S, M, dtype=torch.bool, device=dev)
    drop.scatter_(-1, idx, torch.arange(kmax, device=dev)[None, :] < to_device(excess, dev)[:, None])
    store.compact(~drop)
    return excess


def per_segment(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-row ``[B]`` values repeated for every head: ``[B, H]`` (``[B, H]`` passes through)."""
    if values.dim() == 1:
        return values[:, None].expand(-1, num_heads).clone()
    return values

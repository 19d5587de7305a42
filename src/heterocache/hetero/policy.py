"""The HeteroCache policy (arXiv 2601.13684): role-aware budgets, host-resident satellites and
drift-triggered refresh.

Per KV head, from the profile:
- volatile and pivot heads keep their full KV;
- anchor and satellite heads keep a share of the budget (inverse-stability ratios), chosen at
  prefill by the attention of the last prompt queries (average-pooled, max over the GQA group);
- satellites also leave their full prompt KV in host memory;
- every ``refresh_interval`` decode steps each pivot scores the buffered queries against its full
  prompt keys; if the median overlap of their top-k sets with its reference set falls below
  ``drift_threshold``, the reference set moves to the newest step's and the pivot's satellites get
  their prompt slots refilled, from host memory, with the positions the pivot now attends to most.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..budget import check_budget
from ..policies.base import Policy, PrefillContext
from ..policies.scoring import pool_scores, reduce_gqa, topk_keep, window_attention_scores
from ..profile import HeadProfile, Role
from ..store import RaggedKVStore
from .drift import overlap, prompt_scores
from .host_store import SatelliteHostStore
from .plan import plan_tokens
from .transfer import RefreshTransfer


@dataclass
class RefreshStats:
    """What the refresh mechanism did (see ``HeteroCache.stats``)."""

    checks: int = 0
    refreshes: Counter = field(default_factory=Counter)  # (layer, pivot) -> drift events
    satellite_refills: int = 0
    tokens_moved: int = 0
    bytes_moved: int = 0


class _LayerState:
    """Per-layer runtime state: plans, pivot reference sets, query buffer, host copies."""

    def __init__(self, plan: torch.Tensor, prompt_tokens: torch.Tensor, base: torch.Tensor):
        self.plan = plan  # int64 [B, H] prompt tokens kept
        self.prompt_tokens = prompt_tokens  # int64 [B]
        self.base = base  # int64 [B]: top-k size of the drift check
        self.references: dict[tuple[int, int], torch.Tensor] = {}  # (row, pivot) -> slot indices [k]
        self.queries: list[torch.Tensor] = []  # [B, Hq, D] per buffered decode step
        self.host: SatelliteHostStore | None = None


@dataclass
class HeteroCachePolicy(Policy):
    """HeteroCache as a policy on the ragged engine.

    Args:
        profile: the model's ``HeadProfile``.
        budget: fraction of the prompt KV kept on the device, in (0, 1] (default 0.25). Ignored when
            ``budget_tokens`` is given.
        budget_tokens: absolute budget: average prompt tokens kept per KV head (the fraction is then
            ``min(1, budget_tokens / prompt_tokens)`` per row).
        window: prompt queries whose attention selects the compressed heads' tokens (default 1, the
            last prompt query as in the paper's reference code); these last tokens are always kept.
        kernel: average-pool kernel of the selection and drift scores (default 5).
        refresh_interval: decode steps between drift checks (default 5).
        drift_threshold: a pivot drifted if the median top-k overlap falls below this (default 0.5).
        drift_topk: size of the top-k sets compared (default None: the per-head base budget).
        refresh: switch the drift-triggered refresh (default True).
        offload: keep satellites' full prompt KV in host memory (default True). False = satellites
            fixed after prefill like anchors (and no refresh).
        inverse_stability: budget shares by the profile's inverse-stability ratios (default True);
            False = every compressed head gets the same share.
        asynchronous: on CUDA, copy refreshes on a side stream (default True).
        turn_refresh: what a new turn (several tokens at once, e.g. the question after a compressed
            document) does to the satellites. "always" (default): before the turn is attended,
            every pivot's satellites are refilled with the positions the turn's last query of that
            pivot attends to most, drifted or not: a new turn is a new retrieval, and the drift
            test (median overlap of top-``base`` sets) rarely fires when ``base`` is a large part of
            the prompt. "before": the same only for pivots that drifted. "after": drift-checked
            after the turn was attended (its tokens and the answer's first token then still see
            the satellites chosen at prefill). One refresh per turn; decoding keeps the
            drift-triggered refresh. (The paper decodes a single turn.)
    """

    profile: HeadProfile = None
    budget: float = 0.25
    budget_tokens: int | None = None
    window: int = 1
    kernel: int = 5
    refresh_interval: int = 5
    drift_threshold: float = 0.5
    drift_topk: int | None = None
    refresh: bool = True
    offload: bool = True
    inverse_stability: bool = True
    asynchronous: bool = True
    turn_refresh: str = "always"
    name = "heterocache"

    def __post_init__(self):
        if not isinstance(self.profile, HeadProfile):
            raise TypeError(f"profile must be a HeadProfile, got {type(self.profile).__name__}")
        if self.budget_tokens is not None:
            if isinstance(self.budget_tokens, bool) or not isinstance(self.budget_tokens, int) or self.budget_tokens < 1:
                raise ValueError(f"budget_tokens must be a positive integer, got {self.budget_tokens!r}")
        else:
            self.budget = check_budget(self.budget)
        for name in ("window", "kernel", "refresh_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if not 0.0 <= self.drift_threshold <= 1.0:
            raise ValueError(f"drift_threshold must be in [0, 1], got {self.drift_threshold}")
        if self.turn_refresh not in ("after", "before", "always"):
            raise ValueError(f"turn_refresh must be 'after', 'before' or 'always', got {self.turn_refresh!r}")
        if self.drift_topk is not None and self.drift_topk < 1:
            raise ValueError(f"drift_topk must be >= 1, got {self.drift_topk}")
        roles = self.profile.roles
        self.full = (roles == Role.VOLATILE) | (roles == Role.PIVOT)
        ratios = torch.nan_to_num(self.profile.budget_ratios, nan=1.0)
        self.ratios = ratios if self.inverse_stability else torch.ones_like(ratios)
        self.stats = RefreshStats()
        self._layers: dict[int, _LayerState] = {}
        self._transfer: RefreshTransfer | None = None
        self._checked_fit = False
        self.last_pivot_scores: dict[tuple[int, int], torch.Tensor] = {}  # (row, pivot) at last refresh

    # ------------------------------------------------------------------ roles and plan
    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        return [Role(int(r)).label for r in self.profile.roles[layer_idx]]

    def row_budget(self, prompt_tokens: int) -> float:
        if self.budget_tokens is not None:
            return min(1.0, self.budget_tokens / max(1, prompt_tokens))
        return self.budget

    def plan_for(self, prompt_tokens: int) -> torch.Tensor:
        """Prompt tokens every KV head keeps for a row of ``prompt_tokens`` real tokens:
        int64 ``[layers, kv_heads]``."""
        return plan_tokens(self.full, self.ratios, self.row_budget(prompt_tokens), prompt_tokens)

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        self._check_fit(ctx)
        rows = [self.plan_for(n)[ctx.layer_idx] for n in ctx.prompt_tokens.tolist()]
        return torch.stack(rows).to(ctx.key.device)

    def _check_fit(self, ctx: PrefillContext) -> None:
        if self._checked_fit:
            return
        B, H, L, D = ctx.key.shape
        if ctx.config is not None:
            self.profile.validate_for(ctx.config)
        else:
            self.profile.validate_for(
                {"num_hidden_layers": self.profile.num_layers, "num_attention_heads": ctx.query.shape[1],
                 "num_key_value_heads": H, "head_dim": D}
            )
        self._checked_fit = True

    # ------------------------------------------------------------------ prefill
    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        H = ctx.key.shape[1]
        scores = window_attention_scores(ctx.query, ctx.key, ctx.valid, self.window, ctx.scaling)
        scores = reduce_gqa(pool_scores(scores, self.kernel, "avg"), H, "max")
        return topk_keep(scores, ctx.valid, plan, protect_last=self.window)

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        B = ctx.key.shape[0]
        prompt = ctx.prompt_tokens.cpu()
        plan = store.lengths().cpu().clone()
        base = torch.tensor([self._base_tokens(int(n)) for n in prompt], dtype=torch.long)
        state = _LayerState(plan, prompt, base)
        self._layers[layer_idx] = state
        roles = self.profile.roles[layer_idx]
        satellites = [h for h in range(len(roles)) if roles[h] == Role.SATELLITE]
        if not (self.offload and satellites):
            return
        state.host = SatelliteHostStore(ctx.key, ctx.value, ctx.valid, satellites, pin=store.device.type == "cuda")
        if self._transfer is None:
            self._transfer = RefreshTransfer(store.device, self.asynchronous)
        G = ctx.num_groups
        for p in self.profile.clusters(layer_idx):
            for b in range(B):
                keys = ctx.key[b, p][ctx.valid[b]]
                q = ctx.query[b, p * G : (p + 1) * G, -1:, :].transpose(0, 1)  # [1, G, D]
                scores = prompt_scores(q, keys, ctx.scaling, self.kernel)[0]
                state.references[(b, p)] = scores.topk(self._topk(state, b)).indices

    def _base_tokens(self, prompt_tokens: int) -> int:
        """Per-head base budget (b*H - F) * L / (H - F) of the paper (at least 1)."""
        H, F = self.full.numel(), int(self.full.sum())
        if F == H:
            return prompt_tokens
        b = self.row_budget(prompt_tokens)
        return max(1, min(prompt_tokens, round((b * H - F) * prompt_tokens / (H - F))))

    def _topk(self, state: _LayerState, row: int) -> int:
        k = self.drift_topk if self.drift_topk is not None else int(state.base[row])
        return max(1, min(k, int(state.prompt_tokens[row])))

    # ------------------------------------------------------------------ decode
    def before_attention(self, layer_idx: int) -> None:
        if self._transfer is not None:
            self._transfer.wait(layer_idx)

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._layers.get(layer_idx)
        if state is None or state.host is None or not self.refresh:
            return
        state.queries.append(query[:, :, -1, :])
        if len(state.queries) >= self.refresh_interval:
            self.check_drift(layer_idx, store, scaling)

    def before_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        if self.turn_refresh in ("before", "always"):
            self._check_turn(layer_idx, store, query, scaling, force=self.turn_refresh == "always")

    def on_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        if self.turn_refresh == "after":
            self._check_turn(layer_idx, store, query, scaling)

    def _check_turn(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float,
                    force: bool = False) -> None:
        """A new turn (e.g. the question after a compressed document): its last ``refresh_interval``
        queries are checked for drift at once, so satellites are refreshed before the answer is
        decoded rather than ``refresh_interval`` tokens into it. (The paper only decodes one turn.)
        The drift scores read only the prompt's slots, so the check may run before or after the
        turn's own tokens are appended."""
        state = self._layers.get(layer_idx)
        if state is None or state.host is None or not self.refresh:
            return
        state.queries.clear()
        state.queries.extend(query[:, :, -i, :] for i in range(min(self.refresh_interval, query.shape[2]), 0, -1))
        self.check_drift(layer_idx, store, scaling, force=force)

    def check_drift(self, layer_idx: int, store: RaggedKVStore, scaling: float, force: bool = False) -> list:
        """Score the buffered queries of every pivot; refresh the satellites of those that drifted.

        Args:
            force: refresh as if every pivot had drifted (testing, stress runs).

        Returns:
            ``[(row, pivot), ...]`` that were refreshed.
        """
        state = self._layers[layer_idx]
        if not state.queries:
            return []
        Q = torch.stack(state.queries)  # [steps, B, Hq, D]
        state.queries.clear()
        H = store.num_heads
        G = Q.shape[2] // H
        refreshed = []
        for p, satellites in self.profile.clusters(layer_idx).items():
            for b in range(store.num_rows):
                seg = b * H + p
                n = int(state.prompt_tokens[b])
                lo = int(store.start[seg])
                keys = store.k[lo : lo + n]
                scores = prompt_scores(Q[:, b, p * G : (p + 1) * G, :], keys, scaling, self.kernel)  # [steps, n]
                tops = scores.topk(self._topk(state, b), dim=-1).indices
                self.stats.checks += 1
                drifted = float(overlap(tops, state.references[(b, p)]).median()) < self.drift_threshold
                if not (drifted or force):
                    continue
                state.references[(b, p)] = tops[-1]
                self.last_pivot_scores[(b, p)] = scores[-1]
                self.stats.refreshes[(layer_idx, p)] += 1
                refreshed.append((b, p))
                prompt_pos = store.pos[lo : lo + n]
                for s in satellites:
                    self._refill(layer_idx, store, state, b, s, scores[-1], prompt_pos)
        return refreshed

    def _refill(self, layer_idx, store, state, row, head, pivot_scores, prompt_pos) -> None:
        """Refill a satellite's prompt slots with the pivot's current top positions, from host."""
        n = int(state.plan[row, head])
        if n >= int(state.prompt_tokens[row]):
            return  # it holds the whole prompt already
        idx = pivot_scores.topk(n).indices.sort().values
        k_host, v_host = state.host.gather(row, head, idx.cpu())
        seg = row * store.num_heads + head
        slots = int(store.start[seg]) + torch.arange(n, device=store.device)
        self._transfer.write(layer_idx, store, slots, k_host, v_host)
        store.pos[slots] = prompt_pos[idx]
        self.stats.satellite_refills += 1
        self.stats.tokens_moved += n
        self.stats.bytes_moved += k_host.numel() * k_host.element_size() * 2

    # ------------------------------------------------------------------ bookkeeping
    def host_bytes_per_layer(self) -> dict[int, int]:
        return {i: s.host.nbytes() for i, s in self._layers.items() if s.host is not None}

    def synchronize(self) -> None:
        if self._transfer is not None:
            self._transfer.synchronize()

    def select_rows(self, rows: torch.Tensor) -> None:
        rows = rows.cpu().long()
        for state in self._layers.values():
            state.plan = state.plan.index_select(0, rows)
            state.prompt_tokens = state.prompt_tokens.index_select(0, rows)
            state.base = state.base.index_select(0, rows)
            old_refs, state.references = state.references, {}
            for new, old in enumerate(rows.tolist()):
                for (b, p), ref in old_refs.items():
                    if b == old:
                        state.references[(new, p)] = ref
            state.queries = [q.index_select(0, rows.to(q.device)) for q in state.queries]
            if state.host is not None:
                state.host.select_rows(rows)

    def reset(self) -> None:
        self._layers.clear()
        self.last_pivot_scores.clear()
        self.stats = RefreshStats()
        self._transfer = None

"""HeteroCache's prefill: the budget plan of every KV head, the selection of the compressed heads'
prompt tokens, and the per-layer state the refresh and the turns need afterwards (host copies,
clusters, reference sets of the pivots, the heads a new turn re-chooses).

``PrefillSelection`` is one part of ``HeteroCachePolicy`` (``policy.py``): it reads the options
(``config.HeteroCacheOptions``) and the masks and runtime dictionaries the policy sets up
(``full``, ``ratios``, ``host_copy``, ``_layers``, ``_stores``, ...).
"""

from __future__ import annotations

import numpy as np
import torch

from ...engine.architectures import check_architecture
from ...offload.host_kv import HostKV
from ...policy.base import PrefillContext
from ...policy.scoring import pool_scores, reduce_gqa, row_taps, topk_keep, window_attention_scores
from ...profile import Role
from ...profile.clustering import budget_ratios
from ...store.ragged import RaggedKVStore
from .clusters import ClusterLayout, LayoutIndex
from .drift import membership, pivot_scores, topk_sets
from .plan import auto_kernel, budget_floor, check_budget_above_floor, plan_tokens
from .state import LayerState, TurnHeads


class PrefillSelection:
    """Budget plan and prefill selection of ``HeteroCachePolicy``."""

    # ------------------------------------------------------------------ roles and plan
    def _budget_ratios(self) -> torch.Tensor:
        """Inverse-stability share of every compressed head (mean 1 over them; 1.0 for full heads).
        With ``pivot_offload`` the pivots are compressed too: the shares are recomputed over all
        compressed heads from the profile's stability, or, for a profile without stability scores,
        the pivots get the mean share and the others keep the profile's."""
        ratios = self.profile.budget_ratios
        if self.pivot_offload:
            roles = self.profile.roles.clone()
            roles[roles == Role.PIVOT] = int(Role.SATELLITE)  # any compressed role: only the set matters
            if self.profile.has_stability:
                ratios = budget_ratios(roles, self.profile.stability)
            else:  # the pivots get the mean share of the profile's compressed heads
                ratios = torch.where(self.profile.roles == Role.PIVOT, ratios[~ratios.isnan()].mean(), ratios)
        return torch.nan_to_num(ratios, nan=1.0)

    def _floor_text(self) -> tuple[str, str]:
        """(roles kept full, how to go lower) for the infeasible-budget errors, over the
        compressible layers."""
        if self.pivot_offload:
            return "volatile; pivot_offload=True", ""
        roles = self.profile.roles[self.model_layers]
        if not self.offload or not bool((roles == Role.PIVOT).any()):
            return "volatile and pivot", ""
        low = budget_floor(roles == Role.VOLATILE)
        return "volatile and pivot", f" (or pivot_offload=True: its floor is {low:.4f})"

    def _set_compressible(self, model_layers) -> None:
        """Restrict the plan's inputs to the layers this policy compresses (model indices)."""
        self.model_layers = list(model_layers)
        self._plan_full, self._plan_ratios = self.full[self.model_layers], self.ratios[self.model_layers]
        self._plan_copy = self.host_copy[self.model_layers]
        self._plans: dict[int, torch.Tensor] = {}  # plan_for memo, by prompt length
        self._reselected_plans: dict[int, torch.Tensor] = {}
        self._kernels: dict[int, int] = {}  # kernel_for memo ("auto"), by prompt length
        self._floor_message = self._floor_text()
        if self.budget_tokens is None:  # a fraction at or below the full heads' share never fits
            check_budget_above_floor(self._plan_full, self.budget, *self._floor_message)

    def row_budget(self, prompt_tokens: int) -> float:
        """The budget fraction of a row of ``prompt_tokens`` real tokens."""
        if self.budget_tokens is not None:
            return min(1.0, self.budget_tokens / max(1, prompt_tokens))
        return self.budget

    def check_prompt(self, prompt_tokens: int) -> None:
        """Raises ``InfeasibleBudgetError`` (a ValueError) when the budget is below the heads kept whole."""
        self.plan_for(prompt_tokens)

    def plan_for(self, prompt_tokens: int) -> torch.Tensor:
        """Prompt tokens every KV head keeps for a row of ``prompt_tokens`` real tokens:
        int64 ``[layers, kv_heads]`` over the compressible layers (``model_layers``; all the
        profile's layers unless the model has sliding-window layers, which keep their window and
        are not counted in the budget). The whole model's plan, also under tensor parallelism
        (each rank keeps its heads' columns), so the ranks together keep exactly what one process
        would. Memoised per prompt length (read it, do not modify it)."""
        n = int(prompt_tokens)
        plan = self._plans.get(n)
        if plan is None:
            plan = plan_tokens(self._plan_full, self._plan_ratios, self.row_budget(n), n, *self._floor_message)
            if self.turn_reselect == "own":
                reselected = self._plan_copy & (plan < n)
            else:
                reselected = torch.zeros_like(plan, dtype=torch.bool)
            self._plans[n], self._reselected_plans[n] = plan, reselected
        return plan

    def reselected_for(self, prompt_tokens: int) -> torch.Tensor:
        """bool ``[layers, kv_heads]``: the heads whose prompt slots a new turn re-chooses from their
        own queries, for a row of ``prompt_tokens`` real tokens (``turn_reselect="own"``: the heads
        with a host copy that keep less than the whole prompt)."""
        self.plan_for(prompt_tokens)
        return self._reselected_plans[int(prompt_tokens)]

    def kernel_for(self, prompt_tokens: int) -> int:
        """The pooling kernel of a row of ``prompt_tokens`` real tokens (``kernel``, resolved)."""
        if self.kernel != "auto":
            return self.kernel
        n = int(prompt_tokens)
        if n not in self._kernels:  # memoised like the plans: every layer's prefill asks again
            self._kernels[n] = auto_kernel(self.plan_for(n), n)
        return self._kernels[n]

    def _kernel_arg(self, prompt_tokens, device) -> int | torch.Tensor:
        """``pool_scores``' kernel for rows of ``prompt_tokens`` (host ints): one int, or per-row taps."""
        return row_taps([self.kernel_for(n) for n in prompt_tokens], device)

    def _base_tokens(self, prompt_tokens: int) -> int:
        """Per-head base budget (b*H - F) * L / (H - F) of the paper (at least 1), over the
        compressible layers' heads."""
        H, F = self._plan_full.numel(), int(self._plan_full.sum())
        if F == H:
            return prompt_tokens
        b = self.row_budget(prompt_tokens)
        return max(1, min(prompt_tokens, round((b * H - F) * prompt_tokens / (H - F))))

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        self._check_fit(ctx)
        heads = self.kv_heads
        rows = [self.plan_for(n)[ctx.layer_idx, heads.start:heads.stop] for n in ctx.prompt_tokens.tolist()]
        return torch.stack(rows).to(ctx.key.device)

    def _check_fit(self, ctx: PrefillContext) -> None:
        if self._checked_fit:
            return
        B, H, L, D = ctx.key.shape
        if ctx.config is not None:
            self.profile.validate_for(ctx.config)
            self._set_compressible(check_architecture(ctx.config).compressible_layers)
        else:
            self.profile.validate_for(
                {"num_hidden_layers": self.profile.num_layers,
                 "num_attention_heads": ctx.query.shape[1] * self._shard().world,
                 "num_key_value_heads": H * self._shard().world, "head_dim": D}
            )
        self._checked_fit = True

    # ------------------------------------------------------------------ prefill
    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        H = ctx.key.shape[1]
        scores = window_attention_scores(ctx.query, ctx.key, ctx.key_valid, self.window, ctx.scaling)
        kernel = self._kernel_arg(ctx.prompt_tokens.tolist(), ctx.key.device)  # prefill: host read is fine
        scores = reduce_gqa(pool_scores(scores, kernel, "avg"), H, "max")
        return topk_keep(scores, ctx.key_valid, plan, protect_last=self.window)

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        B = ctx.key.shape[0]
        prompt = ctx.prompt_tokens.cpu().numpy().astype(np.int64)  # prefill: host reads are fine here
        plan = store.lengths_host()
        base = np.array([self._base_tokens(int(n)) for n in prompt], np.int64)
        k = np.maximum(1, np.minimum(base, prompt))
        state = LayerState(plan, prompt, base, k, ctx.model_layer, self._kernel_arg(prompt, store.device))
        self._stores[layer_idx] = store
        if not self._layers or layer_idx < min(self._layers):
            self._first_layer = layer_idx
        self._layers[layer_idx] = state
        if not self.offload:
            return
        shard = self._shard()
        dev = store.device
        valid = ctx.valid.cpu().numpy()
        Lmax = int(prompt.max()) if B else 0
        state.prompt_pos = np.zeros((B, Lmax), np.int64)
        for b in range(B):
            real = np.nonzero(valid[b])[0]
            state.prompt_pos[b, : len(real)] = real
        # pivot_offload: no clusters (a compressed pivot cannot score the prompt for its satellites).
        clusters = {} if self.pivot_offload else self.profile.clusters(ctx.model_layer)
        layout = ClusterLayout.build(clusters, shard)
        if layout.own or layout.local or layout.exchange:  # a cluster here, or decisions crossing ranks
            self._prefill_clusters(layer_idx, state, store, layout, prompt, plan)
        # Host copies: the cluster satellites (their order first), then the other heads that keep
        # one (anchors with turn_reselect="own", and with pivot_offload pivots and satellites).
        copy = self.host_copy[ctx.model_layer, shard.start:shard.stop]
        heads = list(state.satellites)
        heads += [h for h in range(store.num_heads) if bool(copy[h]) and h not in state.satellites]
        if heads:  # host copies and the copy stream of the layer's own device
            state.host = HostKV.from_prompt(ctx.key, ctx.value, ctx.valid, dev, heads=heads, padded=True)
            self._transfers_for(layer_idx, dev)
        if self.turn_reselect == "own" and heads:
            self._prefill_turn_heads(layer_idx, state, store, heads)
        if not state.pivots:
            return
        # Reference sets: what each pivot's last prompt query attends to.
        G = ctx.num_groups
        q = ctx.query[:, :, -1, :].reshape(B, store.num_heads, G, -1)[:, state.pivots]  # [B, P, G, D]
        scores = self._pivot_scores(state, store, q.unsqueeze(2), ctx.scaling)[:, :, 0]
        tops, in_set = topk_sets(scores, state.k_dev, int(k.max()))
        state.reference = membership(tops, in_set, Lmax)

    def _prefill_clusters(self, layer_idx: int, state: LayerState, store: RaggedKVStore, layout: ClusterLayout,
                          prompt: np.ndarray, plan: np.ndarray) -> None:
        """The layer's pivots and satellites (what this process holds) and their index lists."""
        shard = self._shard()
        state.active, state.layout = True, layout
        # Store indices of what this process holds; pivots of the layer by their global index.
        state.pivots = [shard.local(layout.pivots[i]) for i in layout.own]
        state.satellites = [shard.local(layout.satellites[j]) for j in layout.local]
        state.sat_pivot = [layout.sat_pivot[j] for j in layout.local]
        # Prompt slots of every satellite of the layer, from the whole model's plan (the refill
        # indices of a satellite on another rank are computed here when its pivot is).
        rows = [self.plan_for(int(n))[layer_idx] for n in prompt]
        state.sat_tokens_all = (np.stack([r[layout.satellites].numpy() for r in rows]) if rows
                                else np.zeros((0, len(layout.satellites)), np.int64)).astype(np.int64)
        state.sat_tokens = state.sat_tokens_all[:, layout.local].copy()
        if not np.array_equal(state.sat_tokens, plan[:, state.satellites]):
            raise RuntimeError(f"layer {layer_idx}: stored satellite tokens differ from the model's plan")
        state.index = LayoutIndex.of(layout, store.device)
        state.to_device(store.device)

    def _prefill_turn_heads(self, layer_idx: int, state: LayerState, store: RaggedKVStore,
                            heads: list[int]) -> None:
        """The heads a new turn re-chooses (``state.turn``): those with a host copy (``heads``)
        that ``reselected_for`` marks in some row. Nothing is computed now: a turn scores the
        host copy's keys with its own queries."""
        shard = self._shard()
        marks = np.zeros((store.num_rows, store.num_heads), bool)
        for b, n in enumerate(state.prompt_tokens):
            marks[b] = self.reselected_for(int(n))[layer_idx, shard.start:shard.stop].numpy()
        chosen = [h for h in heads if marks[:, h].any()]
        if not chosen or state.prompt_pos.shape[1] == 0:
            return
        state.turn = TurnHeads(chosen, marks, store.device)
        state.turn.to_device(state.plan, state.prompt_tokens, store.device)

    def _pivot_scores(self, state: LayerState, store: RaggedKVStore, queries: torch.Tensor, scaling: float):
        """``pivot_scores`` of queries ``[B, P, T, G, D]`` over the pivots' prompt keys in the store."""
        keys, valid = state.pivot_keys(store)
        return pivot_scores(queries, keys, valid, scaling, state.kernel)

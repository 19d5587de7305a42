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

import numpy as np
import torch

from ..architectures import check_architecture
from ..budget import check_budget
from ..policies.base import Policy, PrefillContext
from ..policies.scoring import pool_scores, reduce_gqa, topk_keep, window_attention_scores
from ..profile import HeadProfile, Role
from ..store import RaggedKVStore, segment_ranges_host, to_device
from .drift import membership, pivot_scores, set_overlap, topk_sets
from .host_store import SatelliteHostStore
from .plan import check_budget_above_floor, plan_tokens
from .transfer import RefreshTransfer


@dataclass
class RefreshStats:
    """What the refresh mechanism did (see ``HeteroCache.stats``)."""

    checks: int = 0
    refreshes: Counter = field(default_factory=Counter)  # (layer, pivot) -> drift events
    satellite_refills: int = 0
    tokens_moved: int = 0
    bytes_moved: int = 0
    late_decisions: int = 0  # deferred decisions whose copy had not landed when due (host waited)


class _LayerState:
    """Per-layer runtime state, host values as NumPy and device values as tensors.

    Attributes:
        plan: int64 ``[B, H]`` prompt tokens kept per head (host).
        prompt_tokens, base, k: int64 ``[B]`` (host): real prompt tokens, per-head base budget,
            size of the drift check's top-k sets; ``k_dev`` the latter on the device.
        pivots: the layer's pivot heads; ``satellites`` all its satellites, ``sat_pivot`` the index
            (into ``pivots``) of each one's pivot, ``sat_tokens`` int64 ``[B, Ns]`` their prompt slots.
        prompt_pos: int64 ``[B, Lmax]`` logical position of each row's j-th real prompt token (host).
        reference: bool ``[B, P, Lmax]`` device: each pivot's reference top-k set as a map.
        queries: buffered decode queries ``[B, Hq, D]`` (device).
        pending: decisions computed on the device, acted on a later step (``_Decision``).
        model_layer: the layer's index in the model (the profile's row; the policy's own index
            counts compressible layers only).
    """

    def __init__(self, plan: np.ndarray, prompt_tokens: np.ndarray, base: np.ndarray, k: np.ndarray):
        self.plan, self.prompt_tokens, self.base, self.k = plan, prompt_tokens, base, k
        self.model_layer = 0  # the layer's index in the model (the policy's index may differ)
        self.k_dev: torch.Tensor | None = None
        self.pivots: list[int] = []
        self.satellites: list[int] = []
        self.sat_pivot: list[int] = []
        self.sat_tokens = np.zeros((len(plan), 0), np.int64)
        self.sat_tokens_dev: torch.Tensor | None = None
        self.prompt_pos = np.zeros((len(plan), 0), np.int64)
        self.reference: torch.Tensor | None = None
        self.queries: list[torch.Tensor] = []
        self.host: SatelliteHostStore | None = None
        self.pending: list[_Decision] = []
        # (layout_version, idx [B, P, Lmax], valid [B, P, Lmax], strides or None)
        self._pivot_index = None

    def pivot_index(self, store: RaggedKVStore) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Slot index and validity ``[B, P, Lmax]`` of every pivot's prompt tokens, and, when the
        pivots' first slots are evenly spaced over rows and pivots (always for one pivot and row),
        ``(first, row_step, pivot_step)`` in slots so the keys can be read as a view instead of a
        gather. Host-built, cached until the store's layout changes."""
        if self._pivot_index is None or self._pivot_index[0] != store.layout_version:
            B, H = store.num_rows, store.num_heads
            Lmax = int(self.prompt_tokens.max()) if B else 0
            j = np.arange(Lmax)
            n = self.prompt_tokens[:, None, None]
            first = store.start_h.reshape(B, H)[:, self.pivots]  # [B, P]
            idx = first[:, :, None] + np.minimum(j[None, None, :], np.maximum(n - 1, 0))
            valid = np.broadcast_to(j[None, None, :] < n, idx.shape)
            self._pivot_index = (store.layout_version, to_device(idx, store.device),
                                 to_device(valid, store.device, torch.bool), _even_spacing(first, Lmax, store))
        return self._pivot_index[1], self._pivot_index[2], self._pivot_index[3]

    def pivot_keys(self, store: RaggedKVStore) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pivot's prompt keys ``[B, P, Lmax, D]`` (a strided view where the layout allows,
        else gathered; padded slots hold other tokens and are masked by ``valid``) and ``valid``."""
        idx, valid, spacing = self.pivot_index(store)
        if spacing is None:
            return store.k[idx], valid
        first, row_step, pivot_step = spacing
        D = store.k.shape[-1]
        shape = (idx.shape[0], idx.shape[1], idx.shape[2], D)
        return store.k.as_strided(shape, (row_step * D, pivot_step * D, D, 1),
                                  store.k.storage_offset() + first * D), valid


def _even_spacing(first: np.ndarray, length: int, store: RaggedKVStore) -> tuple | None:
    """``(first, row_step, pivot_step)`` when ``first[b, p] == first + b*row_step + p*pivot_step``
    and every ``length``-slot window stays inside the buffer, else None."""
    if first.size == 0 or not store.k.is_contiguous():
        return None
    B, P = first.shape
    row_step = int(first[1, 0] - first[0, 0]) if B > 1 else 0
    pivot_step = int(first[0, 1] - first[0, 0]) if P > 1 else 0
    expected = first[0, 0] + np.arange(B)[:, None] * row_step + np.arange(P)[None, :] * pivot_step
    if not np.array_equal(first, expected) or int(first.max()) + length > store.k.shape[0]:
        return None
    return int(first[0, 0]), row_step, pivot_step


#: Steps between a decode-time drift check and the host acting on it. The check runs after the
#: layer's attention at step t; its decision reaches the host without a wait and is acted on at
#: the start of step t + 2, when the device has long finished step t (the host runs at most about a
#: step ahead). A synchronous refresh would be visible from step t + 1: satellites see a drift
#: refresh one step later than that.
DECISION_LAG = 2


@dataclass
class _Decision:
    """A drift check's outcome, on its way to the host without blocking it."""

    due: int  # policy step at which the host acts on it
    host: torch.Tensor  # int64: drifted [B * P] then refill indices [B * Ns * nmax] (pinned on CUDA;
    # the copy's target, kept referenced until the host has read it through ``view``)
    view: np.ndarray  # the same memory as NumPy
    event: object  # CUDA event recorded after the copy (None off CUDA)
    scores: torch.Tensor  # float32 [B, P, Lmax] each pivot's newest scores (device)
    nmax: int


@dataclass
class HeteroCachePolicy(Policy):
    """HeteroCache as a policy on the ragged engine.

    Args:
        profile: the model's ``HeadProfile``.
        budget: fraction of the prompt KV kept on the device, in (0, 1] (default 0.25), over the
            full-attention layers (sliding-window layers keep their window and are not counted;
            the profile still describes every layer). Ignored when ``budget_tokens`` is given.
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
        # The layers this policy compresses (model indices) and the plan's inputs restricted to them:
        # every layer until the model's config says some are sliding (their KV is outside the budget).
        self._set_compressible(range(self.profile.num_layers))
        self.stats = RefreshStats()
        self._layers: dict[int, _LayerState] = {}
        self._transfer: RefreshTransfer | None = None
        self._checked_fit = False
        self._stores: dict[int, RaggedKVStore] = {}
        self._step = 0  # forward passes seen (counted at the first layer)
        self._first_layer: int | None = None
        self.last_pivot_scores: dict[tuple[int, int], torch.Tensor] = {}  # (row, pivot) at last refresh

    # ------------------------------------------------------------------ roles and plan
    def _set_compressible(self, model_layers) -> None:
        self.model_layers = list(model_layers)
        self._plan_full, self._plan_ratios = self.full[self.model_layers], self.ratios[self.model_layers]
        if self.budget_tokens is None:  # a fraction at or below the full heads' share never fits
            check_budget_above_floor(self._plan_full, self.budget)

    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        """Roles of a compressible layer's heads (``layer_idx``: the policy's index of the layer)."""
        return [Role(int(r)).label for r in self.profile.roles[self.model_layers[layer_idx]]]

    def row_budget(self, prompt_tokens: int) -> float:
        if self.budget_tokens is not None:
            return min(1.0, self.budget_tokens / max(1, prompt_tokens))
        return self.budget

    def plan_for(self, prompt_tokens: int) -> torch.Tensor:
        """Prompt tokens every KV head keeps for a row of ``prompt_tokens`` real tokens:
        int64 ``[layers, kv_heads]`` over the compressible layers (``model_layers``; all the
        profile's layers unless the model has sliding-window layers, which keep their window and
        are not counted in the budget)."""
        return plan_tokens(self._plan_full, self._plan_ratios, self.row_budget(prompt_tokens), prompt_tokens)

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
            self._set_compressible(check_architecture(ctx.config).compressible_layers)
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
        prompt = ctx.prompt_tokens.cpu().numpy().astype(np.int64)  # prefill: host reads are fine here
        plan = store.lengths_host()
        base = np.array([self._base_tokens(int(n)) for n in prompt], np.int64)
        k = np.maximum(1, np.minimum(base if self.drift_topk is None else self.drift_topk, prompt))
        state = _LayerState(plan, prompt, base, k)
        state.model_layer = ctx.model_layer
        self._stores[layer_idx] = store
        if not self._layers or layer_idx < min(self._layers):
            self._first_layer = layer_idx
        self._layers[layer_idx] = state
        roles = self.profile.roles[ctx.model_layer]
        satellites = [h for h in range(len(roles)) if roles[h] == Role.SATELLITE]
        if not (self.offload and satellites):
            return
        state.host = SatelliteHostStore(ctx.key, ctx.value, ctx.valid, satellites, pin=store.device.type == "cuda")
        if self._transfer is None:
            self._transfer = RefreshTransfer(store.device, self.asynchronous)
        clusters = self.profile.clusters(ctx.model_layer)
        state.pivots = list(clusters)
        for i, p in enumerate(state.pivots):
            for sat in clusters[p]:
                state.satellites.append(sat)
                state.sat_pivot.append(i)
        state.sat_tokens = plan[:, state.satellites].copy()
        state.sat_tokens_dev = to_device(state.sat_tokens, store.device)
        state.k_dev = to_device(k, store.device)
        valid = ctx.valid.cpu().numpy()
        Lmax = int(prompt.max()) if B else 0
        state.prompt_pos = np.zeros((B, Lmax), np.int64)
        for b in range(B):
            real = np.nonzero(valid[b])[0]
            state.prompt_pos[b, : len(real)] = real
        # Reference sets: what each pivot's last prompt query attends to.
        G = ctx.num_groups
        q = ctx.query[:, :, -1, :].reshape(B, store.num_heads, G, -1)[:, state.pivots]  # [B, P, G, D]
        scores = self._pivot_scores(state, store, q.unsqueeze(2), ctx.scaling)[:, :, 0]
        tops, in_set = topk_sets(scores, state.k_dev, int(k.max()))
        state.reference = membership(tops, in_set, Lmax)

    def _pivot_scores(self, state: _LayerState, store: RaggedKVStore, queries: torch.Tensor, scaling: float):
        """``pivot_scores`` of queries ``[B, P, T, G, D]`` over the pivots' prompt keys in the store."""
        keys, valid = state.pivot_keys(store)
        return pivot_scores(queries, keys, valid, scaling, self.kernel)

    def _base_tokens(self, prompt_tokens: int) -> int:
        """Per-head base budget (b*H - F) * L / (H - F) of the paper (at least 1), over the
        compressible layers' heads."""
        H, F = self._plan_full.numel(), int(self._plan_full.sum())
        if F == H:
            return prompt_tokens
        b = self.row_budget(prompt_tokens)
        return max(1, min(prompt_tokens, round((b * H - F) * prompt_tokens / (H - F))))

    # ------------------------------------------------------------------ decode
    def before_attention(self, layer_idx: int) -> None:
        if layer_idx == self._first_layer:
            self._step += 1
            self._act_on_due_decisions()
        if self._transfer is not None:
            self._transfer.wait(layer_idx)

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._layers.get(layer_idx)
        if state is None or state.host is None or not self.refresh:
            return
        state.queries.append(query[:, :, -1, :])
        if len(state.queries) >= self.refresh_interval:
            self.check_drift(layer_idx, store, scaling, defer=True)

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
        turn's own tokens are appended. Not a decode step: acted on at once (host reads allowed);
        decisions of earlier decode steps still in flight are superseded."""
        state = self._layers.get(layer_idx)
        if state is None or state.host is None or not self.refresh:
            return
        state.pending.clear()
        state.queries.clear()
        state.queries.extend(query[:, :, -i, :] for i in range(min(self.refresh_interval, query.shape[2]), 0, -1))
        self.check_drift(layer_idx, store, scaling, force=force)

    def check_drift(self, layer_idx: int, store: RaggedKVStore, scaling: float, force: bool = False,
                    defer: bool = False) -> list:
        """Score the buffered queries of every pivot and row at once; refresh the satellites of the
        pivots that drifted.

        One batched computation for the layer (no loop over pivots or rows): the pivots' prompt
        keys gathered with a host-planned index, their pooled attention, top-k sets, overlaps with
        the reference sets and the median over the buffered steps, all on the device; the
        reference sets of drifted pivots move on the device too. The decision and the satellites'
        refill indices then go to the host in one copy.

        Args:
            force: refresh as if every pivot had drifted (testing, stress runs, a new turn).
            defer: the decode step's mode: the copy is non-blocking (pinned memory and an event on
                CUDA) and the host acts on it ``DECISION_LAG`` steps later, so nothing waits for
                the device. False: act now (reads the device; returns what was refreshed).

        Returns:
            ``[(row, pivot), ...]`` refreshed (empty when deferred).
        """
        state = self._layers[layer_idx]
        if not state.queries:
            return []
        Q = torch.stack(state.queries)  # [T, B, Hq, D]
        state.queries.clear()
        T, B, Hq, D = Q.shape
        P, G = len(state.pivots), Hq // store.num_heads
        if P == 0:
            return []
        q = Q.view(T, B, store.num_heads, G, D)[:, :, state.pivots].permute(1, 2, 0, 3, 4)  # [B, P, T, G, D]
        scores = self._pivot_scores(state, store, q, scaling)  # [B, P, T, Lmax]
        tops, in_set = topk_sets(scores, state.k_dev, int(state.k.max()))
        self.stats.checks += B * P
        drifted = set_overlap(tops, in_set, state.reference, state.k_dev).median(-1).values < self.drift_threshold
        if force:
            drifted = torch.ones_like(drifted)
        newest = membership(tops[:, :, -1], in_set[:, :, -1], state.reference.shape[-1])
        state.reference = torch.where(drifted[..., None], newest, state.reference)
        last = scores[:, :, -1]  # [B, P, Lmax]
        refill, nmax = self._refill_indices(state, last)
        packed = torch.cat([drifted.long().reshape(-1), refill.reshape(-1)])
        decision = self._send_to_host(packed, last, nmax, store.device)
        if defer:
            state.pending.append(decision)
            return []
        return self._refill(layer_idx, store, state, decision)

    def _refill_indices(self, state: _LayerState, last: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Prompt indices each satellite would be refilled with: the top ``sat_tokens`` of its
        pivot's newest scores, ascending, padded with ``Lmax``: int64 ``[B, Ns, nmax]``."""
        Lmax = last.shape[-1]
        nmax = int(min(state.sat_tokens.max(), Lmax)) if state.sat_tokens.size else 0
        if nmax == 0:
            return last.new_zeros(last.shape[0], len(state.satellites), 0, dtype=torch.long), 0
        sat_scores = last[:, state.sat_pivot]  # [B, Ns, Lmax]
        top = sat_scores.topk(nmax, dim=-1).indices
        keep = torch.arange(nmax, device=top.device) < state.sat_tokens_dev[:, :, None]
        return torch.where(keep, top, Lmax).sort(-1).values, nmax

    def _send_to_host(self, packed: torch.Tensor, last, nmax: int, device) -> _Decision:
        """Copy ``packed`` into host memory without blocking (pinned + event on CUDA)."""
        due = self._step + DECISION_LAG
        if device.type != "cuda":
            view = np.empty(packed.shape, np.int64)
            host = torch.from_numpy(view)
            host.copy_(packed)
            return _Decision(due, host, view, None, last, nmax)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return _Decision(due, host, host.numpy(), event, last, nmax)

    def _act_on_due_decisions(self) -> None:
        """Refill what the decisions that are due ask for (start of a step, so the copies overlap
        the layers that run before each refreshed one)."""
        for layer_idx, state in self._layers.items():
            while state.pending and state.pending[0].due <= self._step:
                self._refill(layer_idx, self._stores[layer_idx], state, state.pending.pop(0))

    def flush(self) -> None:
        """Act on every decision still in flight now (waits for the device): tests, inspection,
        row changes."""
        for layer_idx, state in self._layers.items():
            while state.pending:
                self._refill(layer_idx, self._stores[layer_idx], state, state.pending.pop(0))

    def _refill(self, layer_idx: int, store: RaggedKVStore, state: _LayerState, decision: _Decision) -> list:
        """Refill the satellites of the drifted pivots with their pivot's current top positions:
        one host gather and one (asynchronous on CUDA) copy for the whole layer."""
        if decision.event is not None and not decision.event.query():
            self.stats.late_decisions += 1
            decision.event.synchronize()
        B, P, Ns = len(state.prompt_tokens), len(state.pivots), len(state.satellites)
        drifted = decision.view[: B * P].reshape(B, P).astype(bool)
        idx = decision.view[B * P :].reshape(B, Ns, decision.nmax)
        refreshed = []
        for b, i in zip(*np.nonzero(drifted)):
            b, p = int(b), state.pivots[int(i)]
            refreshed.append((b, p))
            self.stats.refreshes[(state.model_layer, p)] += 1
            self.last_pivot_scores[(b, p)] = decision.scores[b, int(i), : int(state.prompt_tokens[b])]
        # Satellites of a drifted pivot that do not already hold their whole prompt.
        due = drifted[:, state.sat_pivot] & (state.sat_tokens < state.prompt_tokens[:, None])  # [B, Ns]
        rows_h, sat_h = np.nonzero(due)
        if not len(rows_h):
            return refreshed
        counts_h = state.sat_tokens[rows_h, sat_h]
        heads_h = np.asarray(state.satellites, np.int64)[sat_h]
        picks_h = idx[rows_h, sat_h][np.arange(decision.nmax)[None, :] < counts_h[:, None]]  # row after row
        k_host, v_host = state.host.gather_batch(rows_h, heads_h, picks_h, counts_h)
        slots = segment_ranges_host(store.start_h[rows_h * store.num_heads + heads_h], counts_h)
        positions = state.prompt_pos[np.repeat(rows_h, counts_h), picks_h]
        self._transfer.write(layer_idx, store, to_device(slots, store.device), k_host, v_host,
                             to_device(positions, store.device, torch.int32))
        self.stats.satellite_refills += len(rows_h)
        self.stats.tokens_moved += int(counts_h.sum())
        self.stats.bytes_moved += k_host.numel() * k_host.element_size() * 2
        return refreshed

    # ------------------------------------------------------------------ bookkeeping
    def host_bytes_per_layer(self) -> dict[int, int]:
        return {i: s.host.nbytes() for i, s in self._layers.items() if s.host is not None}

    def synchronize(self) -> None:
        if self._transfer is not None:
            self._transfer.synchronize()

    def select_rows(self, rows: torch.Tensor) -> None:
        self.flush()
        rows_h = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        for state in self._layers.values():
            state.plan, state.prompt_tokens = state.plan[rows_h], state.prompt_tokens[rows_h]
            state.base, state.k = state.base[rows_h], state.k[rows_h]
            state.sat_tokens, state.prompt_pos = state.sat_tokens[rows_h], state.prompt_pos[rows_h]
            if state.reference is not None:
                dev = state.reference.device
                state.reference = state.reference[to_device(rows_h, dev)]
                state.k_dev, state.sat_tokens_dev = to_device(state.k, dev), to_device(state.sat_tokens, dev)
            state.queries = [q.index_select(0, to_device(rows_h, q.device)) for q in state.queries]
            state._pivot_index = None
            if state.host is not None:
                state.host.select_rows(torch.from_numpy(rows_h))
        self.last_pivot_scores.clear()

    def reset(self) -> None:
        self._layers.clear()
        self._stores.clear()
        self.last_pivot_scores.clear()
        self.stats = RefreshStats()
        self._transfer = None
        self._step = 0
        self._first_layer = None


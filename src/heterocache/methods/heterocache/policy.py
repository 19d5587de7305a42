"""The HeteroCache policy (arXiv 2601.13684): role-aware budgets, host-resident satellites and
drift-triggered refresh.

Per KV head, from the profile:
- volatile and pivot heads keep their full KV (pivots are compressed too with ``pivot_offload``);
- anchor and satellite heads keep a share of the budget (inverse-stability ratios), chosen at
  prefill by the attention of the last prompt queries (pooled, max over the GQA group);
- satellites also leave their full prompt KV in host memory, and so do anchors by default
  (``anchor_offload``), so that a new turn re-chooses every compressed head's tokens from the
  turn's own queries (``turn_reselect="own"``);
- every ``refresh_interval`` decode steps each pivot scores the buffered queries against its full
  prompt keys; if the median overlap of their top-k sets with its reference set falls below
  ``drift_threshold``, the reference set moves to the newest step's and the pivot's satellites get
  their prompt slots refilled, from host memory, with the positions the pivot now attends to most.

Tensor parallel (``heterocache.engine.parallel``): each rank holds a contiguous slice of every layer's KV
heads. The budget plan is the whole model's, each rank keeping its heads' columns; a pivot is
scored on its rank, a satellite refilled on its own. A profile's clusters may cross the shards
(the profiler never sees the tensor-parallel layout): then the pivot's rank computes the refill
indices of its satellites elsewhere, and one all-reduce per drift check of such a layer carries
the layer's drift flags and those indices to every rank (``_ClusterLayout``). The ranks together
then store exactly what one process stores; layers whose clusters stay within a shard exchange
nothing.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ...engine.architectures import check_architecture
from ...engine.parallel import KVShard, TensorParallelError
from ...offload.host_store import SatelliteHostStore
from ...offload.transfer import RefreshTransfer
from ...policy.base import Policy, PrefillContext
from ...policy.budget import check_budget_spec
from ...policy.pages import page_bounds, page_minmax
from ...policy.scoring import pool_scores, reduce_gqa, row_taps, topk_keep, window_attention_scores
from ...profile import HeadProfile, Role
from ...profile.clustering import budget_ratios
from ...store.ragged import RaggedKVStore, segment_ranges_host, to_device
from .drift import membership, pivot_scores, set_overlap, topk_sets
from .plan import auto_kernel, budget_floor, check_budget_above_floor, pivot_offload_pays, plan_tokens


@dataclass
class RefreshStats:
    """What the refresh mechanism did (see ``HeteroCache.stats``)."""

    checks: int = 0
    refreshes: Counter = field(default_factory=Counter)  # (layer, pivot) -> drift events
    satellite_refills: int = 0
    tokens_moved: int = 0
    bytes_moved: int = 0
    late_decisions: int = 0  # deferred decisions whose copy had not landed when due (host waited)
    reselected_heads: int = 0  # (row, head) prompt-slot re-selections (turn_reselect="own"), turns and drift
    summary_checks: int = 0  # (row, head) drift checks from page summaries (summary_drift)
    summary_refreshes: int = 0  # of which drifted (re-chosen during decoding)


class _LayerState:
    """Per-layer runtime state, host values as NumPy and device values as tensors.

    Attributes:
        plan: int64 ``[B, H]`` prompt tokens kept per head (host).
        prompt_tokens, base, k: int64 ``[B]`` (host): real prompt tokens, per-head base budget,
            size of the drift check's top-k sets; ``k_dev`` the latter on the device.
        pivots: the pivot heads this process scores (indices into its store's heads; all the
            layer's pivots in one process); ``satellites`` the satellites it stores (store
            indices, the host store's order), ``sat_pivot`` the index of each one's pivot among
            the layer's pivots (``layout.pivots``), ``sat_tokens`` int64 ``[B, Ns]`` their prompt
            slots. ``layout``/``index``: which rank decides what (``_ClusterLayout``).
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
        self.kernel: int | torch.Tensor = 1  # pool_scores' kernel for these rows (int, or per-row taps)
        self.active = False  # takes part in drift checks (holds a pivot or satellite, or exchanges)
        self.k_dev: torch.Tensor | None = None
        self.pivots: list[int] = []
        self.satellites: list[int] = []
        self.sat_pivot: list[int] = []
        self.sat_tokens = np.zeros((len(plan), 0), np.int64)
        self.sat_tokens_dev: torch.Tensor | None = None
        # Tensor parallel layout (``_ClusterLayout``); in one process pivots, targets and
        # satellites are the layer's own, in the profile's order.
        self.layout: _ClusterLayout | None = None
        self.index: _LayoutIndex | None = None
        self.sat_tokens_all = np.zeros((len(plan), 0), np.int64)  # every satellite of the layer (global)
        self.target_tokens_dev: torch.Tensor | None = None
        self.prompt_pos = np.zeros((len(plan), 0), np.int64)
        self.reference: torch.Tensor | None = None
        self.queries: list[torch.Tensor] = []
        self.host: SatelliteHostStore | None = None
        self.pending: list[_Decision] = []
        # turn_reselect="own": the heads (store indices) whose prompt slots a new turn re-chooses,
        # their page summaries ``[B * Nr, pages, D]`` (KV dtype, device) and, per row, which of
        # them are re-chosen (``summarised`` bool ``[B, H]`` host: planned below the prompt, and,
        # with the summaries inside the budget, able to pay for them).
        self.reselect: list[int] = []
        self.reselect_dev: torch.Tensor | None = None
        self.reselect_slots: torch.Tensor | None = None  # turn_scoring="keys": their host-copy slots (CPU)
        self.summ_min: torch.Tensor | None = None
        self.summ_max: torch.Tensor | None = None
        self.summarised = np.zeros(plan.shape, bool)
        self.summarised_dev: torch.Tensor | None = None  # [B, Nr] bool: summarised[:, reselect]
        self.prompt_dev: torch.Tensor | None = None  # [B] prompt tokens (device)
        self.reselect_counts_dev: torch.Tensor | None = None  # [B, Nr] prompt slots (0: not re-chosen)
        self.reselect_nmax = 0
        self.summ_reference: torch.Tensor | None = None  # bool [B, Nr, pages]: page set of the last choice
        self.summ_queries: list[torch.Tensor] = []  # summary_drift: buffered decode queries [B, Hq, D]
        self.summ_pending: list[_Decision] = []
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


@dataclass
class _ClusterLayout:
    """Who decides and who refills, for one layer's clusters (host values built at prefill from
    the profile and the ``KVShard``; the same lists on every rank).

    A pivot's drift check runs on the rank holding the pivot (its queries and full prompt keys
    are there); a satellite's refill runs on the rank holding the satellite (its host copy and
    store slots are there). When the two differ (a *cross* satellite: the profile clustered
    heads that tensor parallelism put on different ranks) the decision travels: after each check
    every rank sums over the shards one buffer with the drift flag of every pivot of the layer
    and the refill indices of every cross satellite, each written by its pivot's rank and zero
    elsewhere (one all-reduce of ``B * (P + Nx * nmax)`` int64 per checked layer). Each rank then
    refills exactly what one process would.

    Attributes:
        pivots: global heads of the layer's pivots (the profile's order).
        satellites: global heads of its satellites (pivot after pivot, ascending); ``sat_pivot``
            the index of each one's pivot in ``pivots``.
        own: indices (into ``pivots``) of the pivots this rank holds: the ones it scores.
        targets: indices (into ``satellites``) of the satellites whose pivot this rank holds (it
            computes their refill indices); ``target_pivot`` the index (into ``own``) of that pivot.
        local: indices (into ``satellites``) of the satellites this rank stores.
        cross: indices (into ``satellites``) of the satellites on another rank than their pivot;
            empty in one process or when the profile's clusters stay within the shards.
        local_src: each local satellite's row in ``cat([target refills, cross refills])``; None
            when the local satellites are exactly the targets (no exchange).
        cross_src, cross_dst: the targets that are cross satellites, as rows of the target refills
            and of the cross refills.
    """

    pivots: list[int]
    satellites: list[int]
    sat_pivot: list[int]
    own: list[int]
    targets: list[int]
    target_pivot: list[int]
    local: list[int]
    cross: list[int]
    local_src: list[int] | None
    cross_src: list[int]
    cross_dst: list[int]

    @property
    def exchange(self) -> bool:
        """Whether the layer's decisions cross the ranks (every rank then joins its collective)."""
        return bool(self.cross)

    @classmethod
    def build(cls, clusters: dict[int, list[int]], shard: KVShard) -> "_ClusterLayout":
        pivots = list(clusters)
        satellites, sat_pivot = [], []
        for i, p in enumerate(pivots):
            satellites.extend(clusters[p])
            sat_pivot.extend([i] * len(clusters[p]))
        own = [i for i, p in enumerate(pivots) if shard.owns(p)]
        own_index = {i: n for n, i in enumerate(own)}
        targets = [j for j, i in enumerate(sat_pivot) if i in own_index]
        local = [j for j, s in enumerate(satellites) if shard.owns(s)]
        cross = [j for j, s in enumerate(satellites) if shard.rank_of(s) != shard.rank_of(pivots[sat_pivot[j]])]
        t_index = {j: n for n, j in enumerate(targets)}
        x_index = {j: n for n, j in enumerate(cross)}
        local_src = None if local == targets else [t_index[j] if j in t_index else len(targets) + x_index[j]
                                                   for j in local]
        return cls(pivots, satellites, sat_pivot, own, targets, [own_index[sat_pivot[j]] for j in targets], local,
                   cross, local_src, [t_index[j] for j in cross if j in t_index],
                   [x_index[j] for j in cross if j in t_index])


@dataclass
class _LayoutIndex:
    """A ``_ClusterLayout``'s index lists as device tensors (built once per prefill, so a check
    copies no index to the device)."""

    own: torch.Tensor
    target_pivot: torch.Tensor
    local_src: torch.Tensor | None
    cross_src: torch.Tensor
    cross_dst: torch.Tensor

    @classmethod
    def of(cls, layout: _ClusterLayout, device: torch.device) -> "_LayoutIndex":
        return cls(to_device(layout.own, device), to_device(layout.target_pivot, device),
                   None if layout.local_src is None else to_device(layout.local_src, device),
                   to_device(layout.cross_src, device), to_device(layout.cross_dst, device))


#: Steps between a decode-time drift check and the host acting on it. The check runs after the
#: layer's attention at step t; its decision reaches the host without a wait and is acted on at
#: the start of step t + 2, when the device has long finished step t (the host runs at most about a
#: step ahead). A synchronous refresh would be visible from step t + 1: satellites see a drift
#: refresh one step later than that.
DECISION_LAG = 2

#: Turn queries that score a re-chosen head's prompt at a new turn (``turn_scoring="keys"``): about
#: a whole question. On SmolLM2 (query-agnostic, 4096 tokens, budget 0.25, 39-token questions) the
#: right answer's log-probability loses 1.66 nats against the full cache with the last query, 1.02
#: with the last 8, 0.47-0.64 with 12 to 32 (README; the RULER average: 1 query 3.8 points under 8).
TURN_WINDOW = 32


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
    skip: np.ndarray | None = None  # bool [B, Ns]: satellites not to refill (re-chosen on their own)


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
        score_window: prompt queries whose attention scores the selection when it should differ
            from the tokens always kept (default None: ``window``). A question at the end of the
            prompt is then read whole, as a later turn's is (``turn_window``), without its tokens
            taking slots it would not win.
        kernel: pooling kernel of the selection and drift scores: an odd int, or "auto" (default):
            per prompt length, from the prompt tokens the compressed heads keep on average
            (``hetero.plan.auto_kernel``: for SmolLM2 at 4096 tokens 15 at budget 0.25, where the
            pivots are compressed by default, 5 there with ``pivot_offload=False``, 15 at 0.5);
            rows of one batch may differ, each pooled with its own.
        pooling: how the selection scores (prefill, and ``turn_scoring="keys"``) pool over
            ``kernel`` neighbours: "avg" (default, the paper's) or "max" (every token within
            ``kernel // 2`` of a peak scores as the peak, so a chosen peak brings its neighbours:
            spans are kept whole; ties within a plateau are broken by ``topk``, so the kept
            neighbours of a cut plateau may differ between devices). The drift scores always
            average.
        refresh_interval: decode steps between drift checks (default 5).
        drift_threshold: a pivot drifted if the median top-k overlap falls below this (default 0.5).
        drift_topk: size of the top-k sets compared (default None: the per-head base budget).
        refresh: switch the drift-triggered refresh (default True).
        offload: keep satellites' full prompt KV in host memory (default True). False = no host
            copies at all: satellites fixed after prefill like anchors, no refresh, and
            ``turn_reselect`` falls back to "pivot" (``pivot_offload`` is refused).
        inverse_stability: budget shares by the profile's inverse-stability ratios (default True);
            False = every compressed head gets the same share.
        asynchronous: on CUDA, copy refreshes on a side stream (default True).
        decision_lag: decode steps between a drift check and the host acting on its decision
            (default ``DECISION_LAG`` = 2: the decision travels to the host without a wait, and
            a refresh is visible one step later than a synchronous one). 0: act at once, as the
            paper does; the host then waits for the device at every check.
        turn_refresh: what a new turn (several tokens at once, e.g. the question after a compressed
            document) does to the satellites. "always" (default): before the turn is attended,
            every pivot's satellites are refilled with the positions the turn's last query of that
            pivot attends to most, drifted or not: a new turn is a new retrieval, and the drift
            test (median overlap of top-``base`` sets) rarely fires when ``base`` is a large part of
            the prompt. "before": the same only for pivots that drifted. "after": drift-checked
            after the turn was attended (its tokens and the answer's first token then still see
            the satellites chosen at prefill). One refresh per turn; decoding keeps the
            drift-triggered refresh. (The paper decodes a single turn.)
        turn_reselect: how a new turn re-chooses the compressed heads' prompt slots. "own"
            (default): before the turn is attended, every compressed head with a host copy
            (satellites, and anchors with ``anchor_offload``) re-chooses its prompt slots with the
            turn's own queries of that head, scored as ``turn_scoring`` says, and the chosen tokens,
            ascending, are copied from host memory into the slots (one host gather and one copy per
            layer, as a satellite refill). The satellites so re-chosen skip the pivot's turn refill;
            decoding keeps the pivot-driven refresh. A single turn (a prompt, then one token per
            step) never reaches this: its tokens are those of "pivot". "pivot" (the paper's
            single-turn behaviour): only satellites, with what their pivot attends to; anchors keep
            their prefill choice for good and no anchor keeps a host copy. With ``offload=False``
            no head keeps a host copy and "pivot" is used.
        turn_scoring: how ``turn_reselect="own"`` scores a head's prompt at a new turn. "keys"
            (default): the head's full prompt keys from its host copy, brought to the device for
            the turn only (transient, like the turn's activations; nothing taken from the budget):
            the attention of the turn's last ``turn_window`` queries over them, pooled (``kernel``,
            ``pooling``) and maxed over the group's query heads exactly as the prefill selection
            scores its prompt, and the top tokens taken one by one, i.e. what a query-aware
            prefill would have kept with the turn as its question. Costs a host-to-device copy of
            the re-chosen heads' prompt keys per turn (half their host bytes). "pages": Quest's
            bound ``sum_d max(q_d min_d, q_d max_d)`` (max over the turn's last
            ``refresh_interval`` queries of the group) on per-page channel min/max summaries of the
            head's full prompt keys (built at prefill before compression, in the KV dtype; see
            ``summary_memory``), pages taken best first, their tokens in order, until the head's
            slots are filled (the last page taken may be cut): cheap to read (``2 / page_size`` of
            the keys) but coarse where a head keeps few tokens.
        turn_window: turn queries ``turn_scoring="keys"`` scores with (default 32: about a
            question and the chat template's tail; None = ``window``, as the prefill selection).
        anchor_offload: keep the anchors' full prompt KV in host memory too (counted in the memory
            report's host bytes). Default None: on exactly when the cache is meant for further
            turns, i.e. with ``turn_reselect="own"`` (the default); True/False to force it.
        pivot_offload: lower the budget floor from (volatile + pivot) / all KV heads to volatile /
            all: pivots are compressed on the device like the other heads (their
            inverse-stability share, chosen at prefill the same way) and keep their full prompt KV
            in host memory. A compressed pivot cannot score the whole prompt on the device, so there
            are no cluster refreshes: every compressed head (pivots, satellites, anchors, each with a
            host copy) is re-chosen from its own queries at a new turn (``turn_reselect="own"``,
            needed; so is ``anchor_offload``, on by default) and, with ``summary_drift``, on its own
            drift while decoding (``refresh``, ``turn_refresh`` have nothing to act on). On SmolLM2 at
            budget 0.25 the compressed heads then keep ~950 tokens of 4096 instead of ~89 (the
            ``"auto"`` kernel widens to 15). "auto" (default): on where it multiplies the compressed
            heads' mean share of the prompt by ``PIVOT_OFFLOAD_GAIN`` (2) or more, or the budget is
            under the volatile-and-pivot floor (``hetero.plan.pivot_offload_pays``: SmolLM2 up to
            budget 0.36, Llama-3.1-8B up to 0.29), and the options allow it (``offload``,
            ``turn_reselect="own"``, ``anchor_offload`` not False); off with ``budget_tokens``
            (the fraction is only known per prompt). Resolved at construction to True or False.
        page_size: tokens per page of the re-selection summaries (default 16, Quest's).
        summaries_in_budget: (``turn_scoring="pages"``) count the summaries inside the budget
            (default True): a re-chosen head's summaries (``ceil(prompt / page_size)`` pages of a
            min and a max key, in the KV dtype) cost exactly as many bytes as that many prompt
            tokens (a key and a value), so
            its planned prompt tokens ``n`` become ``n - pages``, and a head is re-chosen only when
            ``n - pages >= page_size`` (at least one page of slots; otherwise it keeps its ``n``
            tokens, no summaries, and the "pivot" behaviour). The device bytes (store + summaries)
            then equal the plan's. False: the plan is unchanged and the summaries are extra device
            bytes (reported, as Quest's).
        summary_memory: where the re-selection summaries live between turns. "device" (default):
            on the device, counted as ``summaries_in_budget`` says. "host": in host memory (pinned
            on CUDA; the memory report's host bytes), copied to the device only while a new turn
            re-chooses (transient, like the turn's activations): the device bytes stay the plan's
            without taking slots from any head, so a head re-chooses at any budget. Not with
            ``summary_drift``, which reads the summaries every check.
        summary_drift: during decoding, also watch each re-chosen head's own drift from its page
            summaries (default False; needs ``turn_reselect="own"``): every ``refresh_interval``
            steps its buffered queries bound its pages; a head whose new page set keeps less than
            ``drift_threshold`` of the one it was last chosen with is re-chosen from host memory
            (deferred like a pivot's decision; ``check_summary_drift``). Anchors and satellites
            whose pivot is a poor proxy are so refreshed too; re-chosen satellites then skip their
            pivot's refills. Cost per check and layer: a ``[G*T, D] x [D, pages]`` bound product
            per head, a sort of its pages and of its prompt's token indices, and one device-to-host
            copy of ``B * Nr * (1 + nmax)`` int64, without blocking.
    """

    profile: HeadProfile = None
    budget: float = 0.25
    budget_tokens: int | None = None
    window: int = 1
    score_window: int | None = None
    kernel: int | str = "auto"
    pooling: str = "avg"
    refresh_interval: int = 5
    drift_threshold: float = 0.5
    drift_topk: int | None = None
    refresh: bool = True
    offload: bool = True
    inverse_stability: bool = True
    asynchronous: bool = True
    decision_lag: int = DECISION_LAG
    turn_refresh: str = "always"
    turn_reselect: str = "own"
    turn_scoring: str = "keys"
    turn_window: int | None = TURN_WINDOW
    anchor_offload: bool | None = None
    pivot_offload: bool | str = "auto"
    page_size: int = 16
    summaries_in_budget: bool = True
    summary_memory: str = "device"
    summary_drift: bool = False
    name = "heterocache"
    # crop() (assisted decoding) would leave buffered drift queries, decisions in flight and
    # refilled satellites describing tokens that were rolled back: refused, not silently stale.
    croppable = False

    def __post_init__(self):
        if not isinstance(self.profile, HeadProfile):
            raise TypeError(f"profile must be a HeadProfile, got {type(self.profile).__name__}")
        self.budget, self.budget_tokens = check_budget_spec(self.budget, self.budget_tokens)
        if isinstance(self.kernel, str) and self.kernel != "auto":
            raise ValueError(f"kernel must be an odd int or 'auto', got {self.kernel!r}")
        for name in ("window", "kernel", "refresh_interval"):
            value = getattr(self, name)
            if value != "auto" and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("turn_window", "score_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.decision_lag < 0:
            raise ValueError(f"decision_lag must be >= 0, got {self.decision_lag}")
        if self.kernel != "auto" and self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if not 0.0 <= self.drift_threshold <= 1.0:
            raise ValueError(f"drift_threshold must be in [0, 1], got {self.drift_threshold}")
        if self.turn_refresh not in ("after", "before", "always"):
            raise ValueError(f"turn_refresh must be 'after', 'before' or 'always', got {self.turn_refresh!r}")
        if self.drift_topk is not None and self.drift_topk < 1:
            raise ValueError(f"drift_topk must be >= 1, got {self.drift_topk}")
        if self.turn_reselect not in ("pivot", "own"):
            raise ValueError(f"turn_reselect must be 'pivot' or 'own', got {self.turn_reselect!r}")
        if not self.offload:  # no host copies: nothing a turn could re-choose from
            self.turn_reselect = "pivot"
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.turn_scoring not in ("pages", "keys"):
            raise ValueError(f"turn_scoring must be 'pages' or 'keys', got {self.turn_scoring!r}")
        if self.summary_drift and self.turn_scoring != "pages":
            raise ValueError("summary_drift watches the page summaries: use turn_scoring='pages'")
        if self.summary_memory not in ("device", "host"):
            raise ValueError(f"summary_memory must be 'device' or 'host', got {self.summary_memory!r}")
        if self.summary_drift and self.summary_memory == "host":
            raise ValueError("summary_drift reads the page summaries every check: use summary_memory='device'")
        if self.summary_drift and self.turn_reselect != "own":
            raise ValueError("summary_drift watches the heads turn_reselect='own' re-chooses from host copies: set "
                             "turn_reselect='own' (and offload=True)")
        roles = self.profile.roles
        pivots = roles == Role.PIVOT
        # Compressed pivots are re-chosen from their host copies at a new turn, as every head then is.
        pivots_can_offload = self.offload and self.turn_reselect == "own" and self.anchor_offload is not False
        if self.pivot_offload == "auto":  # where it buys the compressed heads far more tokens
            self.pivot_offload = (pivots_can_offload and self.budget_tokens is None
                                  and pivot_offload_pays(roles == Role.VOLATILE, pivots, self.budget))
        elif not isinstance(self.pivot_offload, bool):
            raise ValueError(f"pivot_offload must be True, False or 'auto', got {self.pivot_offload!r}")
        if self.pivot_offload and not pivots_can_offload:
            raise ValueError("pivot_offload re-chooses every compressed head from its host copy at a new turn: "
                             "it needs offload=True, turn_reselect='own' and anchor_offload (not False)")
        if self.anchor_offload is None:  # on when the cache is meant for further turns
            self.anchor_offload = self.turn_reselect == "own"
        self.anchor_offload = bool(self.anchor_offload) and self.offload
        self.full = (roles == Role.VOLATILE) | (pivots & (not self.pivot_offload))
        self.ratios = self._budget_ratios() if self.inverse_stability else torch.ones(roles.shape)
        # Compressed heads with a host copy of their full prompt KV (the ones a turn can re-choose).
        self.host_copy = (((roles == Role.SATELLITE) & self.offload) | ((roles == Role.ANCHOR) & self.anchor_offload)
                          | (pivots & self.pivot_offload))
        # The layers this policy compresses (model indices) and the plan's inputs restricted to them:
        # every layer until the model's config says some are sliding (their KV is outside the budget).
        self._set_compressible(range(self.profile.num_layers))
        self.stats = RefreshStats()
        self._layers: dict[int, _LayerState] = {}
        self._transfers: dict[str, RefreshTransfer] = {}  # one per device (device_map spreads layers)
        self._layer_transfer: dict[int, RefreshTransfer] = {}
        self._plans: dict[int, torch.Tensor] = {}  # plan_for memo, by prompt length
        self._checked_fit = False
        self._stores: dict[int, RaggedKVStore] = {}
        self._step = 0  # forward passes seen (counted at the first layer)
        self._first_layer: int | None = None
        # model layer -> (scores [B, P_own, Lmax] device, the pivots' heads, prompt tokens) at its last refresh
        self.last_pivot_scores: dict[int, tuple] = {}

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
        self.model_layers = list(model_layers)
        self._plan_full, self._plan_ratios = self.full[self.model_layers], self.ratios[self.model_layers]
        self._plan_copy = self.host_copy[self.model_layers]
        self._plans = {}
        self._summarised_plans: dict[int, torch.Tensor] = {}
        self._kernels: dict[int, int] = {}  # kernel_for memo ("auto"), by prompt length
        self._floor_message = self._floor_text()
        if self.budget_tokens is None:  # a fraction at or below the full heads' share never fits
            check_budget_above_floor(self._plan_full, self.budget, *self._floor_message)

    def bind_kv_shard(self, shard: KVShard) -> None:
        """Tensor parallel: this process holds the KV heads ``shard.heads`` of every layer. The
        plan stays the whole model's (each rank keeps its slice of it); clusters whose pivot and
        satellites sit on different ranks exchange their drift decisions (``_ClusterLayout``).

        Raises:
            TensorParallelError: the profile describes another number of KV heads per layer.
        """
        if shard.sharded and shard.num_heads != self.profile.num_kv_heads:  # one process: validate_for says
            raise TensorParallelError(
                f"the profile describes {self.profile.num_kv_heads} KV heads per layer, the model has "
                f"{shard.num_heads} (this process holds {shard.num_local} of them: "
                f"heads {shard.start}..{shard.stop - 1})"
            )
        super().bind_kv_shard(shard)

    @property
    def kv_heads(self) -> range:
        """Global KV heads this process holds (all the profile's without tensor parallelism)."""
        return self._shard().heads

    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        """Roles of the heads of a compressible layer that this process holds (``layer_idx``:
        the policy's index of the layer)."""
        heads = self.kv_heads
        return [Role(int(r)).label for r in self.profile.roles[self.model_layers[layer_idx], heads.start:heads.stop]]

    def row_budget(self, prompt_tokens: int) -> float:
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
        would. Memoised per prompt length (read it, do not modify it).

        With ``turn_reselect="own"`` and ``summaries_in_budget``, a re-chosen head's tokens are
        reduced by its summaries' pages (``summarised_for``)."""
        n = int(prompt_tokens)
        plan = self._plans.get(n)
        if plan is None:
            plan = plan_tokens(self._plan_full, self._plan_ratios, self.row_budget(n), n, *self._floor_message)
            summarised = torch.zeros_like(plan, dtype=torch.bool)
            if self.turn_reselect == "own":
                pages = self.summary_pages(n)
                summarised = self._plan_copy & (plan < n)
                if self.summaries_in_budget and self.summary_memory == "device" and self.turn_scoring == "pages":
                    wanted = bool(summarised.any())
                    summarised &= plan - pages >= self.page_size
                    plan = torch.where(summarised, plan - pages, plan)
                    if wanted and not bool(summarised.any()):
                        # n - ceil(L / p) >= p has no page size p when n < 2 * sqrt(L).
                        warnings.warn(
                            f"turn_reselect='own': no compressed head of a {n}-token prompt can pay for its page "
                            f"summaries inside the budget ({pages} pages of {self.page_size} tokens cost more than "
                            "its slots); no head is re-chosen from its own queries. Use summary_memory='host' "
                            "(summaries in host memory), summaries_in_budget=False (extra device bytes), a larger "
                            "page_size or "
                            "a larger budget",
                            stacklevel=2)
            self._plans[n], self._summarised_plans[n] = plan, summarised
        return plan

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

    def summarised_for(self, prompt_tokens: int) -> torch.Tensor:
        """bool ``[layers, kv_heads]``: the heads whose prompt slots a new turn re-chooses from
        page summaries, for a row of ``prompt_tokens`` real tokens (``turn_reselect="own"``)."""
        self.plan_for(prompt_tokens)
        return self._summarised_plans[int(prompt_tokens)]

    def summary_pages(self, prompt_tokens: int) -> int:
        """Pages of a re-chosen head's summaries, ``ceil(prompt_tokens / page_size)``: also the
        prompt tokens they cost inside the budget (a page's min and max key in the KV dtype weigh
        what one token's key and value do)."""
        return -(-int(prompt_tokens) // self.page_size)

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
        scores = window_attention_scores(ctx.query, ctx.key, ctx.valid, self.score_window or self.window,
                                         ctx.scaling)
        kernel = self._kernel_arg(ctx.prompt_tokens.tolist(), ctx.key.device)  # prefill: host read is fine
        scores = reduce_gqa(pool_scores(scores, kernel, self.pooling), H, "max")
        return topk_keep(scores, ctx.valid, plan, protect_last=self.window)

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        B = ctx.key.shape[0]
        prompt = ctx.prompt_tokens.cpu().numpy().astype(np.int64)  # prefill: host reads are fine here
        plan = store.lengths_host()
        base = np.array([self._base_tokens(int(n)) for n in prompt], np.int64)
        k = np.maximum(1, np.minimum(base if self.drift_topk is None else self.drift_topk, prompt))
        state = _LayerState(plan, prompt, base, k)
        state.model_layer = ctx.model_layer
        state.kernel = self._kernel_arg(prompt, store.device)
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
        layout = _ClusterLayout.build(clusters, shard)
        if layout.own or layout.local or layout.exchange:  # a cluster here, or decisions crossing ranks
            self._prefill_clusters(layer_idx, state, store, layout, prompt, plan)
        # Host copies: the cluster satellites (their order first), then the other heads that keep
        # one (anchors with anchor_offload, and with pivot_offload pivots and satellites).
        copy = self.host_copy[ctx.model_layer, shard.start:shard.stop]
        heads = list(state.satellites)
        heads += [h for h in range(store.num_heads) if bool(copy[h]) and h not in state.satellites]
        if heads:  # host copies and the copy stream of the layer's own device
            state.host = SatelliteHostStore(ctx.key, ctx.value, ctx.valid, heads, pin=dev.type == "cuda")
            self._transfers_for(layer_idx, dev)
        if self.turn_reselect == "own" and heads:
            self._build_summaries(layer_idx, state, store, ctx, heads)
        if not state.pivots:
            return
        # Reference sets: what each pivot's last prompt query attends to.
        G = ctx.num_groups
        q = ctx.query[:, :, -1, :].reshape(B, store.num_heads, G, -1)[:, state.pivots]  # [B, P, G, D]
        scores = self._pivot_scores(state, store, q.unsqueeze(2), ctx.scaling)[:, :, 0]
        tops, in_set = topk_sets(scores, state.k_dev, int(k.max()))
        state.reference = membership(tops, in_set, Lmax)

    def _prefill_clusters(self, layer_idx: int, state: _LayerState, store: RaggedKVStore, layout: "_ClusterLayout",
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
        state.index = _LayoutIndex.of(layout, store.device)
        self._to_device(state, store.device)

    def _build_summaries(self, layer_idx: int, state: _LayerState, store: RaggedKVStore, ctx: PrefillContext,
                         heads: list[int]) -> None:
        """Page summaries of the full prompt keys (before compression) of the heads a new turn
        re-chooses: the heads with a host copy that ``summarised_for`` marks in some row. Pages
        cut the row's real tokens in order (the host copy's index), so page ``p`` holds prompt
        tokens ``p * page_size ..`` of the host copy."""
        shard = self._shard()
        B, H = store.num_rows, store.num_heads
        marks = np.zeros((B, H), bool)
        for b, n in enumerate(state.prompt_tokens):
            marks[b] = self.summarised_for(int(n))[layer_idx, shard.start:shard.stop].numpy()
        chosen = [h for h in heads if marks[:, h].any()]
        state.summarised = marks
        if not chosen or state.prompt_pos.shape[1] == 0:
            state.summarised[:] = False
            return
        dev = store.device
        if self.turn_scoring == "keys":  # scored on the host copy's keys at the turn: no summaries
            state.reselect = chosen
            state.reselect_dev = to_device(chosen, dev)
            state.reselect_slots = torch.from_numpy(state.host._slot_of[np.asarray(chosen, np.int64)])
            self._reselect_to_device(state, dev)
            return
        L, D = state.prompt_pos.shape[1], ctx.key.shape[-1]
        idx = to_device(state.prompt_pos, ctx.key.device)  # [B, Lmax]: the j-th real token
        sel = to_device(chosen, ctx.key.device)
        keys = ctx.key.index_select(1, sel).gather(2, idx[:, None, :, None].expand(B, len(chosen), L, D))
        valid = torch.arange(L, device=ctx.key.device) < torch.as_tensor(state.prompt_tokens,
                                                                          device=ctx.key.device)[:, None]
        valid = valid[:, None, :].expand(B, len(chosen), L)
        kmin, kmax = page_minmax(keys.reshape(B * len(chosen), L, D), valid.reshape(B * len(chosen), L),
                                 self.page_size, dtype=store.dtype)
        if self.summary_memory == "host":  # kept off the device between turns
            pin = dev.type == "cuda"  # pinned: the turn's copy to the device is asynchronous
            state.summ_min, state.summ_max = (t.cpu().pin_memory() if pin else t.cpu() for t in (kmin, kmax))
        else:
            state.summ_min, state.summ_max = kmin.to(dev), kmax.to(dev)
        state.reselect = chosen
        state.reselect_dev = to_device(chosen, dev)
        self._reselect_to_device(state, dev)
        # The reference page sets: what the last prompt query chooses (the prefill's own choice).
        T = min(self.refresh_interval, ctx.query.shape[2])
        state.summ_reference = self._reselect_picks(state, store, ctx.query[:, :, -T:, :])[1].to(dev)

    def _reselect_to_device(self, state: _LayerState, dev: torch.device) -> None:
        marks = state.summarised[:, state.reselect]
        counts = np.where(marks, state.plan[:, state.reselect], 0)
        state.summarised_dev = to_device(marks, dev, torch.bool)
        state.prompt_dev = to_device(state.prompt_tokens, dev)
        state.reselect_counts_dev = to_device(counts, dev)
        state.reselect_nmax = int(counts.max()) if counts.size else 0

    def _to_device(self, state: _LayerState, dev: torch.device) -> None:
        """The device copies of the per-row host values (after prefill and row changes)."""
        state.k_dev = to_device(state.k, dev)
        state.sat_tokens_dev = to_device(state.sat_tokens, dev)
        state.target_tokens_dev = to_device(state.sat_tokens_all[:, state.layout.targets], dev)

    def _shard(self) -> KVShard:
        """The KV heads this process holds (every head of the profile when no shard was bound)."""
        if self.kv_shard is None:
            return KVShard.single(self.profile.num_kv_heads)
        return self.kv_shard

    def _transfers_for(self, layer_idx: int, device: torch.device) -> RefreshTransfer:
        """The refresh transfer of a layer: one per device (layers may live on several)."""
        key = str(device)
        if key not in self._transfers:
            self._transfers[key] = RefreshTransfer(device, self.asynchronous)
        self._layer_transfer[layer_idx] = self._transfers[key]
        return self._transfers[key]

    def _pivot_scores(self, state: _LayerState, store: RaggedKVStore, queries: torch.Tensor, scaling: float):
        """``pivot_scores`` of queries ``[B, P, T, G, D]`` over the pivots' prompt keys in the store."""
        keys, valid = state.pivot_keys(store)
        return pivot_scores(queries, keys, valid, scaling, state.kernel)

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
        transfer = self._layer_transfer.get(layer_idx)
        if transfer is not None:
            transfer.wait(layer_idx)

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._layers.get(layer_idx)
        if state is None:
            return
        if self.summary_drift and state.reselect:
            state.summ_queries.append(query[:, :, -1, :])
            if len(state.summ_queries) >= self.refresh_interval:
                self.check_summary_drift(layer_idx, store, defer=self.decision_lag > 0)
        if not state.active or not self.refresh:
            return
        state.queries.append(query[:, :, -1, :])
        if len(state.queries) >= self.refresh_interval:
            # Satellites whose own drift is watched (summary_drift) are not refilled from their pivot's.
            skip = state.summarised[:, state.satellites] if self.summary_drift else None
            self.check_drift(layer_idx, store, scaling, defer=self.decision_lag > 0, skip=skip)

    def before_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        if self.turn_reselect == "own":
            self.reselect_turn(layer_idx, store, query, scaling)
        if self.turn_refresh in ("before", "always"):
            self._check_turn(layer_idx, store, query, scaling, force=self.turn_refresh == "always")

    def reselect_turn(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor,
                      scaling: float | None = None) -> np.ndarray:
        """``turn_reselect="own"``: every re-chosen head of the layer takes, for its prompt slots,
        the best pages of its full prompt keys by its own queries of the turn (``query [B, Hq, q,
        D]``, its last ``refresh_interval``), copied from host memory in order of position.

        One batched computation for the layer on the device (page bounds, ranking, token picks for
        every row and head), one copy of the picks to the host (a new turn, not a decode step),
        one host gather and one (asynchronous on CUDA) copy into the store.

        Returns:
            int64 ``[B, Nr, nmax]`` (host): the prompt indices (the host copy's, i.e. the j-th
            real token) each re-chosen head now holds, ascending, padded with ``Lmax``; heads not
            re-chosen in a row hold ``Lmax`` only.
        """
        state = self._layers.get(layer_idx)
        if state is None or not state.reselect:
            return np.zeros((0, 0, 0), np.int64)
        state.summ_queries.clear()
        # Decode-time decisions still in flight (the heads' own and their pivots') were made on the
        # queries before this turn: superseded, or they would overwrite what is chosen here.
        state.summ_pending.clear()
        state.pending.clear()
        if self.turn_scoring == "keys":
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            W = min(self.turn_window or self.window, query.shape[2])
            picks, member = self._reselect_by_keys(state, store, query[:, :, -W:, :], scale)
        else:
            T = min(self.refresh_interval, query.shape[2])
            picks, member = self._reselect_picks(state, store, query[:, :, -T:, :])
        state.summ_reference = member
        picks = picks.cpu().numpy()
        self._write_picks(layer_idx, store, state, picks, state.summarised[:, state.reselect])
        return picks

    def _reselect_by_keys(self, state: _LayerState, store: RaggedKVStore, query: torch.Tensor,
                          scaling: float) -> tuple[torch.Tensor, None]:
        """``turn_scoring="keys"``: int64 ``[B, Nr, nmax]`` the prompt indices each re-chosen head
        would hold (ascending, padded with ``Lmax``): the top tokens of the attention of queries
        ``[B, Hq, W, D]`` over the head's full prompt keys (host copy, copied to the device for
        this call), pooled and maxed over the group as the prefill selection scores."""
        B, Hq, W, D = query.shape
        H = store.num_heads
        G, Lmax = Hq // H, state.prompt_pos.shape[1]
        dev = query.device
        keys = state.host.k  # [B, held, Lmax, D] (host, pinned on CUDA)
        if not torch.equal(state.reselect_slots, torch.arange(keys.shape[1])):  # host tensors: no device read
            keys = keys.index_select(1, state.reselect_slots)  # [B, Nr, Lmax, D]
        keys = keys.to(dev, non_blocking=True).float()
        q = query.view(B, H, G, W, D).index_select(1, state.reselect_dev).float()  # [B, Nr, G, W, D]
        logits = torch.einsum("brgwd,brld->brgwl", q, keys) * scaling
        valid = torch.arange(Lmax, device=dev) < state.prompt_dev[:, None]  # [B, Lmax]
        logits = logits.masked_fill(~valid[:, None, None, None, :], float("-inf"))
        probs = torch.softmax(logits, -1).sum(3)  # [B, Nr, G, Lmax]
        scores = pool_scores(probs, state.kernel, self.pooling).amax(2)  # [B, Nr, Lmax]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        nmax = state.reselect_nmax
        top = scores.topk(nmax, dim=-1).indices
        keep = torch.arange(nmax, device=dev) < state.reselect_counts_dev[..., None]
        return torch.where(keep, top, Lmax).sort(-1).values, None

    def _reselect_picks(self, state: _LayerState, store: RaggedKVStore,
                        query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device half of a re-selection for queries ``[B, Hq, T, D]``: int64 ``[B, Nr, nmax]``
        the prompt indices each re-chosen head would hold (ascending, padded with ``Lmax``), and
        bool ``[B, Nr, pages]`` the pages they come from (its page set). No host read."""
        B, Hq, T, D = query.shape
        H, Nr, ps = store.num_heads, len(state.reselect), self.page_size
        G, Lmax = Hq // H, state.prompt_pos.shape[1]
        q = query.reshape(B, H, G * T, D).index_select(1, state.reselect_dev)
        # Host summaries (summary_memory="host") come to the device for this turn only.
        kmin, kmax = (t.to(q.device, non_blocking=True) for t in (state.summ_min, state.summ_max))
        bounds = page_bounds(q.reshape(B * Nr, G * T, D), kmin, kmax).amax(1)  # [B*Nr, P]
        pages = bounds.shape[-1]
        bounds = bounds.view(B, Nr, pages)
        dev = bounds.device
        n_prompt = state.prompt_dev  # [B]
        used = (n_prompt + ps - 1) // ps
        bounds = bounds.masked_fill(torch.arange(pages, device=dev) >= used[:, None, None], float("-inf"))
        order = bounds.argsort(dim=-1, descending=True, stable=True)  # pages best first
        tokens = (order[..., None] * ps + torch.arange(ps, device=dev)).flatten(2)  # [B, Nr, pages * ps]
        real = tokens < n_prompt[:, None, None]
        keep = real & (real.cumsum(-1) <= state.reselect_counts_dev[..., None])
        picks = torch.where(keep, tokens, Lmax).sort(-1).values[..., : state.reselect_nmax]
        member = torch.zeros(B, Nr, pages + 1, dtype=torch.bool, device=dev)
        member.scatter_(-1, torch.where(picks < Lmax, picks // ps, pages), True)
        return picks, member[..., :pages]

    def _write_picks(self, layer_idx: int, store: RaggedKVStore, state: _LayerState, picks: np.ndarray,
                     due: np.ndarray) -> None:
        """Host half: copy the picked prompt tokens ``picks [B, Nr, nmax]`` (host) of the
        re-chosen heads marked in ``due [B, Nr]`` from host memory into their prompt slots, in
        order (one host gather and one copy for the layer)."""
        due = due & state.summarised[:, state.reselect]
        rows_h, sel_h = np.nonzero(due)
        if not len(rows_h):
            return
        heads_h = np.asarray(state.reselect, np.int64)[sel_h]
        self._write_from_host(layer_idx, store, state, rows_h, heads_h, picks[rows_h, sel_h],
                              state.plan[rows_h, heads_h])
        self.stats.reselected_heads += len(rows_h)

    def check_summary_drift(self, layer_idx: int, store: RaggedKVStore, defer: bool = True) -> None:
        """``summary_drift``: the buffered decode queries of every re-chosen head bound its pages
        (max over the queries and the group's query heads, as at a turn); a head whose new page set
        keeps less than ``drift_threshold`` of its reference set (the one of its last
        re-selection) drifted: its reference moves to the new set and its prompt slots are
        re-chosen from host memory. All on the device for the layer; the drift flags and picks go
        to the host in one non-blocking copy and are acted on ``DECISION_LAG`` steps later
        (``defer``), as a pivot's decision."""
        state = self._layers[layer_idx]
        if not state.summ_queries:
            return
        Q = torch.stack(state.summ_queries, 2)  # [B, Hq, T, D]
        state.summ_queries.clear()
        picks, member = self._reselect_picks(state, store, Q)
        ref = state.summ_reference
        kept = (member & ref).sum(-1).float() / ref.sum(-1).clamp(min=1).float()  # [B, Nr]
        drifted = (kept < self.drift_threshold) & state.summarised_dev
        state.summ_reference = torch.where(drifted[..., None], member, ref)
        self.stats.summary_checks += int(state.summarised[:, state.reselect].sum())
        packed = torch.cat([drifted.long().reshape(-1), picks.reshape(-1)])
        decision = self._send_to_host(packed, None, picks.shape[-1], store.device)
        state.summ_pending.append(decision)
        if not defer:
            self._act_on_summary_decisions(layer_idx, state, everything=True)

    def _act_on_summary_decisions(self, layer_idx: int, state: _LayerState, everything: bool = False) -> None:
        store = self._stores[layer_idx]
        B, Nr = len(state.prompt_tokens), len(state.reselect)
        while state.summ_pending and (everything or state.summ_pending[0].due <= self._step):
            decision = state.summ_pending.pop(0)
            if decision.event is not None and not decision.event.query():
                self.stats.late_decisions += 1
                decision.event.synchronize()
            drifted = decision.view[: B * Nr].reshape(B, Nr).astype(bool)
            self.stats.summary_refreshes += int(drifted.sum())
            self._write_picks(layer_idx, store, state, decision.view[B * Nr:].reshape(B, Nr, decision.nmax), drifted)

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
        if state is None or not state.active or not self.refresh:
            return
        state.pending.clear()
        state.queries.clear()
        state.queries.extend(query[:, :, -i, :] for i in range(min(self.refresh_interval, query.shape[2]), 0, -1))
        # Satellites the turn re-chose on their own queries are not refilled from their pivot's.
        skip = state.summarised[:, state.satellites] if self.turn_reselect == "own" else None
        self.check_drift(layer_idx, store, scaling, force=force, skip=skip)

    def check_drift(self, layer_idx: int, store: RaggedKVStore, scaling: float, force: bool = False,
                    defer: bool = False, skip: np.ndarray | None = None) -> list:
        """Score the buffered queries of every pivot and row at once; refresh the satellites of the
        pivots that drifted.

        One batched computation for the layer (no loop over pivots or rows): the pivots' prompt
        keys gathered with a host-planned index, their pooled attention, top-k sets, overlaps with
        the reference sets and the median over the buffered steps, all on the device; the
        reference sets of drifted pivots move on the device too. The decision and the satellites'
        refill indices then go to the host in one copy.

        Under tensor parallelism each rank scores the pivots it holds; where a satellite sits on
        another rank than its pivot, one all-reduce per check carries the layer's drift flags and
        those satellites' refill indices (``_ClusterLayout``). Every rank must then run the check
        of that layer at the same step, which it does: the step counts are the same everywhere.

        Args:
            force: refresh as if every pivot had drifted (testing, stress runs, a new turn).
            defer: the decode step's mode: the copy is non-blocking (pinned memory and an event on
                CUDA) and the host acts on it ``DECISION_LAG`` steps later, so nothing waits for
                the device. False: act now (reads the device; returns what was refreshed).
            skip: bool ``[B, Ns]`` (host): satellites not to refill (a new turn re-chose them).

        Returns:
            ``[(row, pivot), ...]`` refreshed by this process (pivots by their global KV head;
            empty when deferred).
        """
        state = self._layers[layer_idx]
        if not state.queries:
            return []
        Q = torch.stack(state.queries)  # [T, B, Hq, D]
        state.queries.clear()
        T, B, Hq, D = Q.shape
        P, G = len(state.pivots), Hq // store.num_heads
        layout = state.layout
        if P == 0 and not layout.exchange:
            return []
        Lmax = int(state.prompt_tokens.max()) if B else 0
        nmax = int(min(state.sat_tokens_all.max(), Lmax)) if state.sat_tokens_all.size else 0
        if P:
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
            refill = self._refill_indices(state, last, nmax)  # [B, targets, nmax]
            drifted = drifted.long()
        else:  # this rank holds none of the layer's pivots, only satellites of pivots elsewhere
            last = None
            drifted = torch.zeros(B, 0, dtype=torch.long, device=store.device)
            refill = torch.zeros(B, 0, nmax, dtype=torch.long, device=store.device)
        if len(layout.own) != len(layout.pivots):  # the layer's drift flags, ours filled in
            drifted = torch.zeros(B, len(layout.pivots), dtype=torch.long,
                                  device=store.device).index_copy_(1, state.index.own, drifted)
        if layout.exchange:
            drifted, refill = self._exchange(state, drifted, refill, nmax)
        packed = torch.cat([drifted.reshape(-1), refill.reshape(-1)])
        decision = self._send_to_host(packed, last, nmax, store.device)
        decision.skip = skip
        if defer:
            state.pending.append(decision)
            return []
        return self._refill(layer_idx, store, state, decision)

    def _refill_indices(self, state: _LayerState, last: torch.Tensor, nmax: int) -> torch.Tensor:
        """Prompt indices each satellite whose pivot this process holds (``layout.targets``)
        would be refilled with: the top ``sat_tokens`` of its pivot's newest scores, ascending,
        padded with ``Lmax``: int64 ``[B, targets, nmax]`` (``nmax``: the most prompt slots of
        any satellite of the layer, the same on every rank)."""
        B, Lmax = last.shape[0], last.shape[-1]
        targets = len(state.layout.targets)
        if nmax == 0 or targets == 0:
            return last.new_zeros(B, targets, nmax, dtype=torch.long)
        sat_scores = last.index_select(1, state.index.target_pivot)  # [B, targets, Lmax]
        top = sat_scores.topk(nmax, dim=-1).indices
        keep = torch.arange(nmax, device=top.device) < state.target_tokens_dev[:, :, None]
        return torch.where(keep, top, Lmax).sort(-1).values

    def _exchange(self, state: _LayerState, drifted: torch.Tensor, refill: torch.Tensor,
                  nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor parallel: sum over the shards the layer's drift flags ``[B, P]`` (each rank's
        own pivots filled in) and the refill indices of the satellites held by another rank than
        their pivot (written by the pivot's rank): one all-reduce of ``B * (P + Nx * nmax)``
        int64. Returns the layer's drift flags and the refill indices of this rank's satellites
        ``[B, Ns, nmax]``."""
        layout, index = state.layout, state.index
        B, P, Nx = drifted.shape[0], drifted.shape[1], len(layout.cross)
        buf = torch.zeros(B, P + Nx * nmax, dtype=torch.long, device=drifted.device)
        buf[:, :P] = drifted
        cross = buf[:, P:].view(B, Nx, nmax)
        if len(layout.cross_src):
            cross.index_copy_(1, index.cross_dst, refill.index_select(1, index.cross_src))
        self.kv_shard.all_reduce_sum_(buf)
        if index.local_src is None:  # this rank's satellites all have their pivot here
            return buf[:, :P], refill
        return buf[:, :P], torch.cat([refill, cross], 1).index_select(1, index.local_src)

    def _send_to_host(self, packed: torch.Tensor, last, nmax: int, device) -> _Decision:
        """Copy ``packed`` into host memory without blocking (pinned + event on CUDA)."""
        due = self._step + self.decision_lag
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
            if state.summ_pending:
                self._act_on_summary_decisions(layer_idx, state)

    def scores_at_refresh(self, layer: int, row: int, pivot: int) -> torch.Tensor:
        """Pivot ``pivot``'s (its KV head) pooled prompt scores ``[prompt tokens]`` in row ``row``
        at the latest drift check of model layer ``layer`` that refreshed satellites (inspection).

        Raises:
            KeyError: that layer never refreshed; ValueError: ``pivot`` is not one of its pivots.
        """
        scores, pivots, prompt = self.last_pivot_scores[layer]
        i = int(np.nonzero(pivots == pivot)[0][0]) if (pivots == pivot).any() else None
        if i is None:
            raise ValueError(f"KV head {pivot} is not a pivot this process scores in layer {layer}")
        return scores[row, i, : int(prompt[row])]

    def flush(self) -> None:
        """Act on every decision still in flight now (waits for the device): tests, inspection,
        row changes."""
        for layer_idx, state in self._layers.items():
            while state.pending:
                self._refill(layer_idx, self._stores[layer_idx], state, state.pending.pop(0))
            self._act_on_summary_decisions(layer_idx, state, everything=True)

    def _refill(self, layer_idx: int, store: RaggedKVStore, state: _LayerState, decision: _Decision) -> list:
        """Refill the satellites of the drifted pivots with their pivot's current top positions:
        one host gather and one (asynchronous on CUDA) copy for the whole layer. Refreshes are
        counted where the pivot is (under tensor parallelism: once over the ranks)."""
        if decision.event is not None and not decision.event.query():
            self.stats.late_decisions += 1
            decision.event.synchronize()
        layout = state.layout
        B, P, Ns = len(state.prompt_tokens), len(layout.pivots), len(state.satellites)
        drifted = decision.view[: B * P].reshape(B, P).astype(bool)
        idx = decision.view[B * P :].reshape(B, Ns, decision.nmax)
        # Host bookkeeping only (NumPy): which (row, pivot) drifted, counted per pivot.
        rows_d, own_d = np.nonzero(drifted[:, layout.own])
        pivots_d = np.asarray(layout.pivots, np.int64)[np.asarray(layout.own, np.int64)[own_d]]
        refreshed = list(zip(rows_d.tolist(), pivots_d.tolist()))
        heads, counts = np.unique(pivots_d, return_counts=True)
        self.stats.refreshes.update({(state.model_layer, int(h)): int(c) for h, c in zip(heads, counts)})
        if len(rows_d):  # the layer's scores once (device), for inspection: ``scores_at_refresh``
            own_pivots = np.asarray(layout.pivots, np.int64)[np.asarray(layout.own, np.int64)]
            self.last_pivot_scores[state.model_layer] = (decision.scores, own_pivots, state.prompt_tokens.copy())
        # Satellites of a drifted pivot that do not already hold their whole prompt.
        due = drifted[:, state.sat_pivot] & (state.sat_tokens < state.prompt_tokens[:, None])  # [B, Ns]
        if decision.skip is not None:
            due &= ~decision.skip
        rows_h, sat_h = np.nonzero(due)
        if not len(rows_h):
            return refreshed
        heads_h = np.asarray(state.satellites, np.int64)[sat_h]
        self._write_from_host(layer_idx, store, state, rows_h, heads_h, idx[rows_h, sat_h],
                              state.sat_tokens[rows_h, sat_h])
        self.stats.satellite_refills += len(rows_h)
        return refreshed

    def _write_from_host(self, layer_idx: int, store: RaggedKVStore, state: _LayerState, rows_h: np.ndarray,
                         heads_h: np.ndarray, picks: np.ndarray, counts_h: np.ndarray) -> None:
        """Overwrite the first ``counts_h[i]`` slots of head ``heads_h[i]`` in row ``rows_h[i]``
        with the prompt tokens ``picks[i, :counts_h[i]]`` (host copy indices, ascending; ``picks``
        int64 ``[n, nmax]``): one host gather and one (asynchronous on CUDA) copy for the layer."""
        picks_h = picks[np.arange(picks.shape[-1])[None, :] < counts_h[:, None]]  # row after row
        k_host, v_host = state.host.gather_batch(rows_h, heads_h, picks_h, counts_h)
        slots = segment_ranges_host(store.start_h[rows_h * store.num_heads + heads_h], counts_h)
        positions = state.prompt_pos[np.repeat(rows_h, counts_h), picks_h]
        self._layer_transfer[layer_idx].write(layer_idx, store, to_device(slots, store.device), k_host, v_host,
                                              to_device(positions, store.device, torch.int32))
        self.stats.tokens_moved += int(counts_h.sum())
        self.stats.bytes_moved += k_host.numel() * k_host.element_size() * 2

    # ------------------------------------------------------------------ bookkeeping
    def host_bytes_per_layer(self) -> dict[int, int]:
        """The host copies, and the page summaries with ``summary_memory="host"``."""
        out = {i: s.host.nbytes() for i, s in self._layers.items() if s.host is not None}
        if self.summary_memory == "host":
            for i, nbytes in self._summary_bytes().items():
                out[i] = out.get(i, 0) + nbytes
        return out

    def device_extra_bytes_per_layer(self) -> dict[int, int]:
        """The re-selection page summaries on the device (``turn_reselect="own"``), allocated bytes."""
        return self._summary_bytes() if self.summary_memory == "device" else {}

    def _summary_bytes(self) -> dict[int, int]:
        return {i: s.summ_min.numel() * s.summ_min.element_size() * 2
                for i, s in self._layers.items() if s.summ_min is not None}

    @property
    def transfers(self) -> dict[str, RefreshTransfer]:
        """The refresh transfers by device (one per device holding satellites)."""
        return dict(self._transfers)

    def synchronize(self) -> None:
        for transfer in self._transfers.values():
            transfer.synchronize()

    def copy_seconds(self) -> float:
        """GPU time spent in refresh copies so far, over every device (0 without CUDA)."""
        return sum(t.copy_seconds() for t in self._transfers.values())

    def select_rows(self, rows: torch.Tensor) -> None:
        self.flush()
        rows_h = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        for layer_idx, state in self._layers.items():
            state.plan, state.prompt_tokens = state.plan[rows_h], state.prompt_tokens[rows_h]
            state.base, state.k = state.base[rows_h], state.k[rows_h]
            state.sat_tokens, state.prompt_pos = state.sat_tokens[rows_h], state.prompt_pos[rows_h]
            state.sat_tokens_all = state.sat_tokens_all[rows_h]
            if isinstance(state.kernel, torch.Tensor):
                state.kernel = state.kernel.index_select(0, to_device(rows_h, state.kernel.device))
            if state.active:
                dev = self._stores[layer_idx].device
                if state.reference is not None:
                    state.reference = state.reference[to_device(rows_h, dev)]
                self._to_device(state, dev)
            state.queries = [q.index_select(0, to_device(rows_h, q.device)) for q in state.queries]
            state.summarised = state.summarised[rows_h]
            if state.summ_min is not None:
                Nr = len(state.reselect)
                shape = state.summ_min.shape
                sel = to_device(rows_h, state.summ_min.device)
                state.summ_min = state.summ_min.view(-1, Nr, *shape[1:])[sel].reshape(-1, *shape[1:])
                state.summ_max = state.summ_max.view(-1, Nr, *shape[1:])[sel].reshape(-1, *shape[1:])
                on_dev = to_device(rows_h, self._stores[layer_idx].device)  # summaries may be on the host
                state.summ_reference = state.summ_reference[on_dev]
                state.summ_queries = [q[on_dev] for q in state.summ_queries]
            if state.reselect:
                self._reselect_to_device(state, self._stores[layer_idx].device)
            state._pivot_index = None
            if state.host is not None:
                state.host.select_rows(torch.from_numpy(rows_h))
        self.last_pivot_scores.clear()

    def reset(self) -> None:
        self._layers.clear()
        self._stores.clear()
        self.last_pivot_scores.clear()
        self.stats = RefreshStats()
        self._transfers.clear()
        self._layer_transfer.clear()
        self._step = 0
        self._first_layer = None

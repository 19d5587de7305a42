"""OmniKV (Hao et al., ICLR 2025, "OmniKV: Dynamic Context Selection for Efficient Long-Context
LLMs", https://openreview.net/forum?id=ulCAPXYXfa; reference code: antgroup/OmniKV).

No token is dropped. At every decode step a few *filter* layers score their whole context with the
step's query and pick the top tokens; the layers after a filter layer, up to the next one, attend
only to those tokens (plus every token decoded since the context was filled): within one step the
important tokens of successive layers are nearly the same. The layers before the first filter layer,
the filter layers themselves and the ``dense_after_filter`` layers behind each filter layer attend
densely. Optionally the context KV of the sparse layers lives in host memory and only the chosen
tokens come to the device at each step.

Layer roles with the published setting (``do_select_layers="2,8,18"``, ``num_wait_load_layers=1``
of the reference's ``configs/example.json``, 32 layers)::

    0 1 | 2      3     | 4 .. 7 | 8      9     | 10 .. 17 | 18     19    | 20 .. 31
    dense | filter dense | sparse | filter dense | sparse   | filter dense | sparse
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch

from ..attention.decode import SlotSelection
from ..engine.registry import register_method
from ..offload.host_kv import HostKV
from ..offload.transfer import RefreshTransfer
from ..policy.base import Policy, PrefillContext
from ..policy.budget import check_budget_spec
from ..store.ragged import RaggedKVStore, to_device

#: The reference's filter layers (``do_select_layers`` of ``configs/example.json``) for its 32-layer
#: Llama-3-8B; other depths scale them (``scaled_filter_layers``).
PUBLISHED_FILTER_LAYERS = (2, 8, 18)
PUBLISHED_DEPTH = 32


def scaled_filter_layers(num_layers: int) -> tuple[int, ...]:
    """The published filter layers (2, 8, 18 of 32) at the same relative depth of a model with
    ``num_layers`` (full-attention) layers: layer ``l`` of 32 becomes ``floor(l * n / 32 + 1/2)``
    (nearest, halves up), at most ``n - 1``, duplicates merged.

    32 -> (2, 8, 18); 30 -> (2, 8, 17); 28 -> (2, 7, 16); 16 -> (1, 4, 9); 4 -> (0, 1, 2); 1 -> (0,).

    Raises:
        ValueError: ``num_layers < 1``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    # floor(l * n / 32 + 1/2) in integers: (2 l n + 32) // 64
    scaled = {min(num_layers - 1, (2 * l * num_layers + PUBLISHED_DEPTH) // (2 * PUBLISHED_DEPTH))
              for l in PUBLISHED_FILTER_LAYERS}
    return tuple(sorted(scaled))


def _parse_layers(layers) -> tuple[int, ...] | None:
    """``filter_layers`` as given (None, a sequence of ints, or the reference's ``"2,8,18"``)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"filter_layers must be layer indices like '2,8,18', got {layers!r}") from None
    try:
        out = tuple(layers)
    except TypeError:
        raise ValueError(f"filter_layers must be a sequence of layer indices, got {layers!r}") from None
    if not out or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in out):
        raise ValueError(f"filter_layers must be non-negative layer indices (at least one), got {layers!r}")
    out = tuple(int(i) for i in out)
    if any(b <= a for a, b in pairwise(out)):
        raise ValueError(f"filter_layers must be strictly increasing, got {out}")
    return out


@register_method(
    "omnikv",
    description="every token kept; per decode step filter layers choose the context tokens the layers behind "
    "them attend to, optionally fetched from host memory (Hao et al. 2025)",
    paper="https://openreview.net/forum?id=ulCAPXYXfa",
)
@dataclass
class OmniKVPolicy(Policy):
    """Filter layers choose each step's tokens; the layers behind them attend only to those.

    Args:
        budget: share of each row's context tokens the sparse layers read per step, in (0, 1]
            (default 0.067: ``num_of_selected_tokens`` of the reference's ``configs/example.json``;
            a float there is a share of the prompt, ``int(share * prompt)``). Here
            ``max(1, floor(budget * context))`` per row.
        budget_tokens: an absolute number of context tokens per row and step instead (the
            reference's integer form of ``num_of_selected_tokens``; its code falls back to 4096
            when none is configured); overrides ``budget``.
        filter_layers: indices (among the model's full-attention layers) of the filter layers, as
            a sequence or the reference's string ``"2,8,18"``. Default None: the reference's
            ``do_select_layers="2,8,18"`` of 32 layers, scaled to the model's depth
            (``scaled_filter_layers``: 32 -> 2, 8, 18; 30 -> 2, 8, 17; 4 -> 0, 1, 2).
        dense_after_filter: layers right behind each filter layer that still attend densely
            (default 1: ``num_wait_load_layers`` of ``configs/example.json`` with ``dense_more=true``,
            the only mode the reference supports; its cache code defaults to 2 when unset). In the
            reference they hide the host-to-device fetch of the offloaded layers; they are dense
            with or without offload (``OmniKVMultiStageCache.layer_state``).
        scores: how the filter layer scores a context token: "logits" (default; the reference's
            ``selector_cls="last"`` of ``configs/example.json``): ``q . k * scaling`` of the step's
            query, maximum over all query heads; "probs" (its ``"softmax_before_last"``, the
            layer's fallback when no selector is configured): each query head's softmax over the
            context first, then the maximum over heads.
        offload: keep the context KV of the sparse layers in host memory (pinned on CUDA) and
            fetch the chosen tokens per step (default False: ``real_offload=false`` of
            ``configs/example.json``; the reference's code defaults to True when unset).

    What the reference code does, and this policy with it (``modeling/omnikv.py``,
    ``modeling/spec_cache.py``):

    - one choice per batch row, shared by every KV head and every sparse layer up to the next
      filter layer (``idx [B, k]`` gathered on the sequence axis of all heads);
    - the scores reduce over heads by ``torch.max`` over all query heads (``repeat_kv`` first);
    - only the context is scored: the tokens stored before decoding started (``consider_len =
      prefill_len``; here: at the end of the last prefill or later turn). Every token decoded since
      is attended by every layer (the reference's ``tail_k``);
    - filter layers attend densely (they are in ``full_attn_layers``), and so do the layers before
      the first filter layer and the ``num_wait_load_layers`` behind each filter layer;
    - chosen indices are sorted by position (``torch.sort(idx)``).

    Not implemented: the reference's "uniform"/"exp" selectors, which score with a window of the
    last ``window_size`` (16) hidden states (only "last"/"softmax_before_last" are); its LightLLM
    port (one filter layer, 8, with 2048 tokens for Llama-3-8B) is reachable with
    ``filter_layers=(8,), budget_tokens=2048``.

    Offload (``offload=True``): the sparse layers keep only their decoded tokens on the device;
    their context is packed in host memory. The choice never leaves the device: right after the
    filter layer's top-k, each sparse layer of its group gets one gather of its chosen tokens
    (``HostKV.gather``): on CUDA a device kernel reading the pinned context through its device alias
    (unified addressing), issued on a side stream so it overlaps the filter layer's attention and
    the ``dense_after_filter`` layers (the overlap the reference gets from its wait layers), and
    waited for by event where the sparse layer attends; on CPU a plain index. Cost per filter
    layer and step: ``k`` tokens per KV head and sparse layer across the host link, no host wait.
    At a later turn an offloaded layer's context comes back to the device for the turn's dense
    attention and returns to the host afterwards.

    With a budget covering every context token (and no offload) the sparse layers attend densely:
    exactly FullKV's result.
    """

    budget: float | None = 0.067
    budget_tokens: int | None = None
    filter_layers: tuple | str | None = None
    dense_after_filter: int = 1
    scores: str = "logits"
    offload: bool = False
    prompt_queries = 0  # reads the prompt's keys and values only
    selects_per_step = True
    # The context bookkeeping (and the host copies) cannot follow a crop: refused, not stale.
    croppable = False

    @property
    def bounded_prefill(self) -> bool:
        """Without offload every prompt token stays on the device: a bounded prefill is the exact one."""
        return not self.offload

    def __post_init__(self):
        self.budget, self.budget_tokens = check_budget_spec(self.budget, self.budget_tokens)
        self.filter_layers = _parse_layers(self.filter_layers)
        if isinstance(self.dense_after_filter, bool) or not isinstance(self.dense_after_filter, int) \
                or self.dense_after_filter < 0:
            raise ValueError(f"dense_after_filter must be an integer >= 0, got {self.dense_after_filter!r}")
        if self.scores not in ("logits", "probs"):
            raise ValueError(f"scores must be 'logits' or 'probs', got {self.scores!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload must be True or False, got {self.offload!r}")
        self.reset()

    # ------------------------------------------------------------------ layer roles
    def layers_for(self, num_layers: int | None) -> tuple[int, ...]:
        """The filter layers for a model with ``num_layers`` full-attention layers.

        Raises:
            ValueError: a given filter layer is not below ``num_layers``, or the depth is unknown
                and no filter layers were given.
        """
        if self.filter_layers is not None:
            if num_layers is not None and self.filter_layers[-1] >= num_layers:
                raise ValueError(
                    f"filter_layers {self.filter_layers} must be below the model's {num_layers} full-attention layers"
                )
            return self.filter_layers
        if num_layers is None:
            raise ValueError("OmniKV scales its filter layers to the model's depth, which is unknown here: "
                             "pass filter_layers=...")
        return scaled_filter_layers(num_layers)

    def role(self, layer_idx: int) -> tuple[str, int | None]:
        """``(role, filter)`` of a layer: "dense" (before the first filter layer or within
        ``dense_after_filter`` behind one), "filter", or "sparse" with the filter layer it follows."""
        layers = self._layers if self._layers is not None else self.layers_for(None)
        if layer_idx < layers[0]:
            return "dense", None
        source = max(f for f in layers if f <= layer_idx)
        if source == layer_idx:
            return "filter", None
        if layer_idx - source <= self.dense_after_filter:
            return "dense", None
        return "sparse", source

    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        if self._layers is None:
            return ["dense"] * num_heads
        return [self.role(layer_idx)[0]] * num_heads

    def _resolve(self, num_layers: int | None) -> None:
        if self._layers is None:
            self._layers = self.layers_for(num_layers)

    def _offloaded(self, layer_idx: int) -> bool:
        return self.offload and self.role(layer_idx)[0] == "sparse"

    # ------------------------------------------------------------------ prefill / later turns
    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        self._resolve(ctx.num_layers)
        if self._offloaded(ctx.layer_idx):  # the context goes to host memory (on_prefill_done)
            B, H = ctx.key.shape[:2]
            return torch.zeros(B, H, dtype=torch.long, device=ctx.key.device)
        return super().plan(ctx)

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        if self._offloaded(ctx.layer_idx):
            return torch.zeros(ctx.key.shape[:3], dtype=torch.bool, device=ctx.key.device)
        return super().select(ctx, plan)

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        role, source = self.role(layer_idx)
        host = None
        if role == "sparse" and self.offload:
            host = HostKV.from_prompt(ctx.key.to(store.dtype), ctx.value.to(store.dtype), ctx.valid, store.device,
                                      positions=True)
            context = host.lengths_h.copy()
            if store.device.type == "cuda" and str(store.device) not in self._transfers:
                self._transfers[str(store.device)] = RefreshTransfer(store.device)
        else:
            context = store.length_h.copy()
        self._set_context(layer_idx, store, context, host)
        if role == "filter":
            self._groups[layer_idx] = _Group()
            self._set_group_budget(layer_idx)
        elif role == "sparse":
            group = self._groups.get(source)
            if group is not None and layer_idx not in group.sparse:
                group.sparse.append(layer_idx)

    def before_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._contexts.get(layer_idx)
        if state is not None and state.host is not None:
            # A later turn attends densely over everything: bring the context back in front of the
            # decoded tokens (on_extend sends it all to host memory again).
            state.host.restore_into(store)
            state.host = None

    def on_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        """A later turn: everything stored now is the context the next decode steps choose from."""
        role, _ = self.role(layer_idx)
        host = None
        if role == "sparse" and self.offload:
            host = HostKV.from_store(store)
            _empty(store)
        self._set_context(layer_idx, store, (host.lengths_h if host is not None else store.length_h).copy(), host)
        if role == "filter":
            self._set_group_budget(layer_idx)

    def _set_context(self, layer_idx: int, store: RaggedKVStore, context: np.ndarray, host) -> None:
        self._contexts[layer_idx] = _Context.build(context, store.num_heads, store.device, host)

    def context_tokens(self, row_context: np.ndarray) -> np.ndarray:
        """Context tokens each row's sparse layers read per step (host values): the budget's share
        (at least 1) or ``budget_tokens``, at most the row's context."""
        row_context = np.asarray(row_context, np.int64)
        if self.budget_tokens is not None:
            k = np.full_like(row_context, self.budget_tokens)
        else:
            k = np.maximum(1, np.floor(self.budget * row_context).astype(np.int64))
        return np.minimum(k, row_context)

    def _set_group_budget(self, layer_idx: int) -> None:
        """The filter layer's tokens per row, from its context (host values, once per turn)."""
        group, state = self._groups[layer_idx], self._contexts[layer_idx]
        device = state.context.device
        row_context = state.context_h[:: state.num_heads]  # every head of a row holds the same context
        group.k_h = self.context_tokens(row_context)
        group.k_max = int(group.k_h.max()) if group.k_h.size else 0
        group.k = to_device(group.k_h, device)
        group.rank = torch.arange(group.k_max, device=device)
        # Without offload, a budget covering every context token means dense attention: FullKV exactly.
        group.dense = not self.offload and bool((group.k_h >= row_context).all())
        group.clear_step()

    # ------------------------------------------------------------------ decode
    def decode_selection(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float):
        role, source = self.role(layer_idx)
        if role == "filter":
            self._choose(layer_idx, store, query, scaling)
            return None
        if role != "sparse":
            return None
        group = self._groups.get(source)
        state = self._contexts.get(layer_idx)
        if group is None or state is None or group.dense or group.chosen is None:
            return None
        B, H = store.num_rows, store.num_heads
        S, k = store.num_segments, group.k_max
        chosen, valid = group.chosen, group.valid
        if chosen.device != store.device:
            chosen, valid = chosen.to(store.device), valid.to(store.device)
        chosen = chosen[:, None, :].expand(B, H, k).reshape(S, k)  # one choice per row, for every head
        valid = valid[:, None, :].expand(B, H, k).reshape(S, k)
        if state.host is None:
            # Decoded tokens (behind the context) first, then the chosen context tokens: the order
            # the offloaded layers attend in, so both give the same numbers.
            tail_len = int((store.length_h - state.context_h).max())
            within = state.context[:, None] + torch.arange(tail_len, device=store.device)[None, :]
            tail_valid = within < store.length[:, None]
            tail = store.start[:, None] + torch.where(tail_valid, within, 0)
            slots = torch.cat([tail, store.start[:, None] + chosen], 1)
            return SlotSelection(slots, torch.cat([tail_valid, valid], 1))
        key, value = self._fetched.pop(layer_idx)
        transfer = self._transfers.get(str(store.device))
        if transfer is not None:
            transfer.wait(layer_idx)
        tail_len = store.max_length()  # the store holds the decoded tokens only
        within = torch.arange(tail_len, device=store.device)[None, :]
        tail_valid = within < store.length[:, None]
        slots = store.start[:, None] + torch.where(tail_valid, within, 0)
        return SlotSelection(slots, tail_valid, key.view(S, k, -1), value.view(S, k, -1), valid)

    def _choose(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        """The filter layer's choice: top context tokens of the step's query, per row (device)."""
        group, state = self._groups.get(layer_idx), self._contexts.get(layer_idx)
        if group is None or state is None or group.dense or not group.sparse or group.k_max == 0:
            return
        B, Hq, _, D = query.shape
        S, C = store.num_segments, state.context_max
        q = query.reshape(S, Hq // store.num_heads, D).to(store.dtype)
        logits = torch.matmul(q, self._context_keys(store, state).transpose(1, 2)).float() * scaling  # [S, G, C]
        outside = ~state.mask[:, None, :]
        scores = logits.masked_fill(outside, float("-inf"))
        if self.scores == "probs":
            scores = torch.softmax(scores, -1).masked_fill(outside, float("-inf"))
        row = scores.view(B, Hq, C).amax(1)  # the maximum over every query head of the row
        if self.kv_shard is not None and self.kv_shard.sharded:
            # Tensor parallel: a rank holds some heads; the row's choice is the maximum over all of
            # them, so every rank picks what one process would (one all-reduce of [B, C] fp32 per
            # filter layer and step).
            row = self.kv_shard.all_reduce_max_(row.contiguous())
        top = row.topk(group.k_max, dim=-1).indices  # [B, k_max]
        keep = group.rank[None, :] < group.k[:, None]  # a row's own k (shorter contexts, fewer)
        top = torch.where(keep, top, C).sort(-1).values  # by position, unused entries last
        group.valid = top < C
        group.chosen = torch.where(group.valid, top, 0)
        if self.offload:
            self._fetch(group)

    @staticmethod
    def _context_keys(store: RaggedKVStore, state: _Context) -> torch.Tensor:
        """The filter layer's context keys ``[S, C, D]`` (C: the longest context): a strided view
        of the flat buffer when every segment has the same capacity, else one gather."""
        S, C, D = store.num_segments, state.context_max, store.head_dim
        caps = store.cap_h
        if caps.size and (caps == caps[0]).all():
            cap = int(caps[0])
            return store.k[: S * cap].view(S, cap, D)[:, :C]
        if state.index is None or state.index_version != store.layout_version:
            ar = torch.arange(C, device=store.device)[None, :]
            state.index = store.start[:, None] + torch.where(state.mask, ar, 0)
            state.index_version = store.layout_version
        return store.k[state.index]

    def _fetch(self, group: _Group) -> None:
        """Start gathering the chosen context tokens of every offloaded layer of the group from
        host memory, right after the filter layer chose them. The indices stay on the device: on
        CUDA each gather is a device kernel reading the pinned context through its device alias
        (``HostKV.gather``), on the side stream, so it overlaps the layers before the sparse one that
        waits for it; the host never waits. On CPU a plain index."""
        for layer_idx in group.sparse:
            host = self._contexts[layer_idx].host
            if host is None:
                continue
            chosen = group.chosen.to(host.device, non_blocking=True)  # device_map: the layer's device
            transfer = self._transfers.get(str(host.device))
            self._fetched[layer_idx] = transfer.run(layer_idx, host.gather, chosen) if transfer else host.gather(chosen)

    # ------------------------------------------------------------------ bookkeeping
    def host_bytes_per_layer(self) -> dict[int, int]:
        return {i: s.host.nbytes() for i, s in self._contexts.items() if s.host is not None}

    def synchronize(self) -> None:
        for transfer in self._transfers.values():
            transfer.synchronize()

    def select_rows(self, rows: torch.Tensor) -> None:
        rows_h = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        self._fetched.clear()
        for layer_idx, state in list(self._contexts.items()):
            H = state.num_heads
            segments = (rows_h[:, None] * H + np.arange(H)).reshape(-1)
            if state.host is not None:
                state.host.select_segments(segments)
            self._contexts[layer_idx] = _Context.build(state.context_h[segments], H, state.context.device,
                                                       state.host)
        for layer_idx in self._groups:
            self._set_group_budget(layer_idx)

    def reset(self) -> None:
        self._layers: tuple[int, ...] | None = None
        self._contexts: dict[int, _Context] = {}
        self._groups: dict[int, _Group] = {}
        self._fetched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._transfers: dict[str, object] = {}  # a RefreshTransfer per CUDA device (side stream)


@dataclass
class _Context:
    """What a layer calls its context: the first ``context_h[s]`` stored tokens of every segment
    (all tokens stored at the end of the last prefill or turn); its host copy when offloaded."""

    context_h: np.ndarray  # int64 [S] (host)
    context: torch.Tensor  # the same on the device
    context_max: int
    mask: torch.Tensor  # bool [S, context_max]: column j is a context token of segment s
    num_heads: int
    host: HostKV | None = None  # the context, packed segment after segment, with its positions
    index: torch.Tensor | None = None  # gather index of the context keys (filter layers), per layout
    index_version: int = -1

    @classmethod
    def build(cls, context_h: np.ndarray, num_heads: int, device, host=None) -> _Context:
        context_h = np.asarray(context_h, np.int64).copy()
        context = to_device(context_h, device)
        cmax = int(context_h.max()) if context_h.size else 0
        mask = torch.arange(cmax, device=device)[None, :] < context[:, None]
        return cls(context_h, context, cmax, mask, num_heads, host)


@dataclass
class _Group:
    """A filter layer's per-row budget and its choice at the current step."""

    k_h: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens per row (host)
    k: torch.Tensor | None = None  # the same on the device
    k_max: int = 0
    rank: torch.Tensor | None = None  # arange(k_max)
    dense: bool = False  # the budget covers every context token: the sparse layers attend densely
    sparse: list = field(default_factory=list)  # the sparse layers reading this layer's choice
    chosen: torch.Tensor | None = None  # int64 [B, k_max] context indices, by position
    valid: torch.Tensor | None = None  # bool [B, k_max]

    def clear_step(self) -> None:
        self.chosen = self.valid = None


def _empty(store: RaggedKVStore) -> None:
    """Drop every token of a store (fresh, minimal buffers)."""
    B, H, D = store.num_rows, store.num_heads, store.head_dim
    none = store.k.new_zeros(B, H, 0, D)
    store.fill(none, none, torch.zeros(B, H, 0, dtype=torch.bool, device=store.device),
               torch.zeros(0, dtype=torch.long, device=store.device))


OmniKVCache = OmniKVPolicy.cache_class

"""ShadowKV (Sun et al., 2024, "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM
Inference", arXiv 2410.21465; reference code: https://github.com/bytedance/ShadowKV,
``models/kv_cache.py``, classes ``ShadowKVCache`` and ``ShadowKVCache_CPU``).

What a compressed layer holds, per batch row:

- on the device: the low-rank factors of the prompt's *pre-RoPE* keys, one truncated SVD per layer
  over all KV heads' keys side by side (``[tokens, H * D] ~ U [tokens, r] @ SV [r, H * D]``, the
  reference's ``get_svd``); one landmark per chunk of ``chunk_size`` prompt tokens, the mean of its
  post-RoPE keys, per KV head; and, exact in the ragged store, the ``outlier_chunks`` chunks per KV
  head whose keys are least like their landmark (lowest minimum cosine similarity), the last
  ``local_chunks`` chunks with the prompt's remainder, and every decoded token;
- in host memory (pinned on CUDA): the values of all other chunks.

Each decode step, per KV head: the query's attention over the landmarks (softmax per query head,
maximum over the GQA group) picks the top chunks up to the per-step budget; their keys are rebuilt
from ``U @ SV`` and rotated at their positions, their values fetched from host memory
(:class:`heterocache.offload.host_kv.HostKV`: a device kernel reading pinned memory on CUDA, no host
synchronisation), and attention reads the exact tokens plus the chosen chunks
(``SlotSelection.extra_*``).

A later turn's tokens (a second ``generate()`` on the same cache) are appended exact, like decoded
tokens (as the reference's ``update_kv_cache``); the turn itself attends to the exact tokens plus
the chunks its queries choose (softmax over the landmarks per query token, summed over the turn,
maximum over the group: the reference's ``get_retrieval_position_ids`` with ``q_len > 1``). The
prompt stays compressed and keeps being chosen from.

A row whose prompt leaves no more candidate chunks than the per-step budget keeps everything
exact; a layer where every row does so is plain full attention, token for token FullKV's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..attention.decode import SlotSelection
from ..engine.registry import register_method
from ..engine.rope import Rotary
from ..offload.host_kv import HostKV
from ..policy.base import Policy, PrefillContext
from ..policy.budget import check_budget
from ..policy.budgeted import HostDevice
from ..store.ragged import RaggedKVStore, to_device

#: The reference's sparse budget: tokens of rebuilt chunks attended per step (``sparse_budget=2048``).
PUBLISHED_BUDGET_TOKENS = 2048
#: The reference's rank 160 for Llama-3.1-8B, whose layers' keys are 8 KV heads x 128 = 1024 wide.
PUBLISHED_RANK = 160 / 1024


@register_method(
    "shadowkv",
    description="pre-RoPE keys as low-rank factors + chunk landmarks on the device, values in host memory; each "
    "decode step rebuilds the top chunks by landmark score (Sun et al. 2024)",
    paper="https://arxiv.org/abs/2410.21465",
)
@dataclass
class ShadowKVPolicy(Policy):
    """ShadowKV: low-rank pre-RoPE keys and chunk landmarks on the device, values in host memory,
    the top chunks by landmark score rebuilt at every decode step (Sun et al. 2024,
    https://arxiv.org/abs/2410.21465).

    Defaults are the reference code's (https://github.com/bytedance/ShadowKV, ``models/kv_cache.py``):

    Args:
        budget: per-step budget as a fraction of each row's prompt tokens, in (0, 1]: the tokens of
            rebuilt chunks attended per step, ``ceil(budget * tokens / chunk_size)`` chunks. Default
            None: ``budget_tokens``.
        budget_tokens: per-step budget in tokens, a multiple of ``chunk_size`` (the reference asserts
            ``sparse_budget % chunk_size == 0``); overrides ``budget``. Default None, which with no
            ``budget`` means 2048, the reference's ``sparse_budget=2048`` (``ShadowKVCache(...,
            sparse_budget=2048)``, the README's RULER runs ``--sparse_budget 2048``). As in the
            reference, the budget counts the rebuilt chunks only: outlier and local chunks and decoded
            tokens are attended besides.
        rank: rank of the keys' truncated SVD as a fraction of the layer's key width ``H * D``
            (``round(rank * H * D)``, at most the prompt length). Default 160/1024: ``rank=160`` on
            Llama-3.1-8B's 8 x 128 (``--rank 160``, ``ShadowKVCache(..., rank=160)``). The same
            share of a narrow key width keeps few dimensions (30 of SmolLM2's 3 x 64 = 192), so
            narrow models may need a larger one: ``benchmarks/shadowkv_keys.py`` reports the key
            error per rank (SmolLM2's figures: docs/benchmarks.md).
        rank_dims: the rank as a number of dimensions instead; overrides ``rank``. Default None.
        chunk_size: tokens per chunk, one landmark each. Default 8 (``chunk_size=8``).
        outlier_chunks: chunks per KV head kept exact for their lowest intra-chunk cosine similarity
            to their landmark. Default 48: ``self.outlier_chunk = 48`` in ``ShadowKVCache``, and
            ``int((sparse_budget // 1024) * 24)`` = 48 at the default budget in ``ShadowKVCache_CPU``
            (which scales it with the budget; here it is fixed).
        local_chunks: the prompt's last chunks kept exact (with the ``tokens % chunk_size`` remainder
            behind them). Default 4 (``self.local_chunk = 4``).

    How the reference does the rest, and so this policy:

    - SVD: one per layer and row over the pre-RoPE keys of *all* prompt tokens, every KV head's
      keys concatenated (``k_cache.transpose(1, 2).reshape(bsz, -1, num_kv_heads * head_dim)``, then
      ``torch.svd``): ``U`` is shared by the heads, ``SV = diag(S) Vh`` is split into per-head ``[r, D]``
      blocks.
    - Landmarks and outliers: per KV head, ``mean`` of each chunk's post-RoPE keys; the
      ``outlier_chunks`` with the lowest ``min`` over the chunk of ``cosine_similarity(landmark,
      key)`` are stored exact and leave the landmark set. Chunks start at the first prompt token;
      ``tokens // chunk_size - local_chunks`` of them (the CPU class also rounds that down to a
      multiple of 8 for its kernels; not done here).
    - Scores and GQA: per KV head, ``softmax(q . landmark * scale)`` over its landmarks for each of
      its query heads, summed over query tokens, ``max`` over the group; top chunks per KV head. The
      reference scales by ``1/sqrt(128)`` (Llama's head_dim); here the layer's own softmax scale.
    - Pre-RoPE keys: the reference's model code SVDs the keys before it applies RoPE. transformers'
      attention receives them after, so the rotation is undone at the positions the model used
      (``position_ids`` of the attention call, left padding included) with the config's RoPE
      (:class:`heterocache.engine.rope.Rotary`: exact inverse, tested).
    - Not reproduced: the CPU class's reuse of chunks already on the device from the previous step
      (a transfer saving, not a change of result), its MInference prefill option.

    Every prompt token's logical slot stays known, so the memory report counts: on the device, the
    exact tokens (store) + ``U``, ``SV``, landmarks, their chunk indices and positions; on the host,
    the values of the landmark chunks.
    """

    budget: float | None = None
    budget_tokens: int | None = None
    rank: float = PUBLISHED_RANK
    rank_dims: int | None = None
    chunk_size: int = 8
    outlier_chunks: int = 48
    local_chunks: int = 4
    prompt_queries = 0  # reads the prompt's keys and values only
    selects_per_step = True
    # The compressed prompt cannot be cut back token by token.
    croppable = False

    def __post_init__(self):
        for field in ("chunk_size", "outlier_chunks", "local_chunks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an integer, got {value!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.outlier_chunks < 0 or self.local_chunks < 0:
            raise ValueError(f"outlier_chunks and local_chunks must be >= 0, got {self.outlier_chunks}, "
                             f"{self.local_chunks}")
        if self.budget_tokens is not None:
            if isinstance(self.budget_tokens, bool) or not isinstance(self.budget_tokens, int):
                raise TypeError(f"budget_tokens must be an integer, got {self.budget_tokens!r}")
            if self.budget_tokens < self.chunk_size or self.budget_tokens % self.chunk_size:
                raise ValueError(f"budget_tokens must be a positive multiple of chunk_size={self.chunk_size} "
                                 f"(whole chunks are rebuilt), got {self.budget_tokens}")
        elif self.budget is not None:
            self.budget = check_budget(self.budget)
        if self.rank_dims is not None:
            if isinstance(self.rank_dims, bool) or not isinstance(self.rank_dims, int) or self.rank_dims < 1:
                raise ValueError(f"rank_dims must be a positive integer, got {self.rank_dims!r}")
        elif isinstance(self.rank, bool) or not isinstance(self.rank, (int, float)) or not 0 < self.rank <= 1:
            raise ValueError(f"rank must be a fraction of the key width in (0, 1] (use rank_dims for a number of "
                             f"dimensions), got {self.rank!r}")
        self._layers: dict[int, ShadowKVLayer] = {}
        self._building: dict[int, tuple] = {}
        self._rotary: dict[tuple, Rotary] = {}

    # ------------------------------------------------------------------ sizes
    def bind_kv_shard(self, shard) -> None:
        super().bind_kv_shard(shard)
        if shard is not None and shard.sharded:
            # One process factors all KV heads of a layer side by side; a rank sees only its own.
            # Reproducing the joint factors would need the other ranks' keys (an all-gather of the
            # prompt's keys per layer), so each rank factors its heads alone: close to, not equal
            # to, the single-process cache (docs/scaling.md).
            warnings.warn(
                f"ShadowKV under tensor parallelism (rank {shard.rank} of {shard.world}) factors the keys of "
                f"this rank's {shard.num_local} KV heads alone: its low-rank keys are not the single-process ones",
                stacklevel=2,
            )

    def budget_chunks(self, prompt_tokens) -> np.ndarray:
        """Chunks rebuilt per step for rows of ``prompt_tokens`` real tokens (host int64 ``[B]``)."""
        n = np.asarray(prompt_tokens, np.int64)
        if self.budget_tokens is not None or self.budget is None:
            tokens = self.budget_tokens if self.budget_tokens is not None else PUBLISHED_BUDGET_TOKENS
            return np.full_like(n, tokens // self.chunk_size)
        return np.maximum(1, np.ceil(self.budget * n / self.chunk_size)).astype(np.int64)

    def rank_for(self, width: int, tokens: int) -> int:
        """Rank of a layer whose keys are ``width`` (``H * D``) wide, for a prompt of ``tokens``."""
        r = self.rank_dims if self.rank_dims is not None else max(1, round(self.rank * width))
        return int(min(r, width, max(tokens, 1)))

    # ------------------------------------------------------------------ roles and memory
    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        return ["shadowkv" if layer_idx in self._layers else "full"] * num_heads

    def device_extra_bytes_per_layer(self) -> dict[int, int]:
        return {i: layer.device_nbytes() for i, layer in self._layers.items()}

    def host_bytes_per_layer(self) -> dict[int, int]:
        return {i: layer.values.nbytes() for i, layer in self._layers.items()}

    def layer(self, layer_idx: int) -> ShadowKVLayer | None:
        """The compressed state of a layer (None: kept exact)."""
        return self._layers.get(layer_idx)

    def reset(self) -> None:
        self._layers.clear()
        self._building.clear()

    def select_rows(self, rows: torch.Tensor) -> None:
        rows_h = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        for idx in list(self._layers):
            layer = self._layers[idx]
            layer.select_rows(rows_h)
            if layer.max_picks == 0:
                del self._layers[idx]

    # ------------------------------------------------------------------ prefill
    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        state, keep = self.compress(ctx)
        self._building[ctx.layer_idx] = (state, keep)
        return keep.sum(-1)

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        return self._building[ctx.layer_idx][1]

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        state, _ = self._building.pop(layer_idx, (None, None))
        if state is None:
            self._layers.pop(layer_idx, None)
        else:
            self._layers[layer_idx] = state

    def rotary_for(self, ctx: PrefillContext, positions: torch.Tensor) -> Rotary:
        if ctx.config is None:
            raise ValueError("ShadowKV undoes the keys' RoPE and needs the model's config; the attention call gave "
                             "none (pass config= to ingest_prefill)")
        seq_len = int(positions.max()) + 1 if positions.numel() else 0  # LongRoPE's short/long choice (prefill)
        key = (id(ctx.config), seq_len)
        rotary = self._rotary.get(key)
        if rotary is None:
            rotary = self._rotary[key] = Rotary.from_config(ctx.config, "full_attention", seq_len=seq_len)
        return rotary

    def compress(self, ctx: PrefillContext) -> tuple[ShadowKVLayer | None, torch.Tensor]:
        """The layer's compressed state (None when nothing is compressed) and the tokens the store
        keeps exact, bool ``[B, H, L]``."""
        valid = ctx.valid
        B, H, L = ctx.key.shape[:3]
        cs = self.chunk_size
        everything = valid[:, None, :].expand(B, H, L).clone()
        n_h = valid.sum(-1).cpu().numpy().astype(np.int64)  # prefill: one read of the prompt lengths
        picks_h = self.budget_chunks(n_h)
        chunks_h = np.maximum(n_h // cs - self.local_chunks, 0)
        cand_h = chunks_h - self.outlier_chunks
        compressed = cand_h > picks_h  # more candidates than the step reads: worth compressing
        if not compressed.any():
            return None, everything
        chunks_h, cand_h, picks_h = (np.where(compressed, x, 0) for x in (chunks_h, cand_h, picks_h))
        positions = ctx.rope_positions()  # [B, L]
        return ShadowKVLayer.build(self, ctx, n_h, chunks_h, cand_h, picks_h, positions,
                                   self.rotary_for(ctx, positions))

    # ------------------------------------------------------------------ decode / extend
    def decode_selection(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float):
        layer = self._layers.get(layer_idx)
        if layer is None:
            return None
        _, Hq, _, D = query.shape
        q = query.reshape(store.num_segments, Hq // store.num_heads, 1, D)
        extra_key, extra_value, extra_valid = layer.extra_tokens(q, scaling)
        slots, valid = store.padded_index()
        return SlotSelection(slots, valid, extra_key, extra_value, extra_valid)

    def extend_extra(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float, valid=None):
        layer = self._layers.get(layer_idx)
        if layer is None:
            return None
        B, Hq, T, D = query.shape
        H = store.num_heads
        q = query.reshape(B, H, Hq // H, T, D).reshape(B * H, Hq // H, T, D)
        token_valid = None if valid is None else valid[:, None, :].expand(B, H, T).reshape(B * H, T)
        return layer.extra_tokens(q, scaling, token_valid)


class ShadowKVLayer:
    """The compressed prompt of one layer (see the module docstring). ``S = B * H`` segments; per row
    ``C`` chunks in the compressed area (the prompt's first ``C * chunk_size`` real tokens), ``M``
    landmark (candidate) chunks per segment, ``k`` of them rebuilt per step.

    Attributes:
        U: ``[B, A, r]`` left factor of the pre-RoPE keys for the compressed area (``A = max C *
            chunk_size``), in the model's dtype.
        SV: ``[S, r, D]`` the right factor's block of each KV head (``diag(S) Vh``).
        landmarks: ``[S, Mmax, D]`` mean post-RoPE key of each candidate chunk (zeros past ``M``).
        chunk_index: int64 ``[S, Mmax]`` which chunk each candidate is (in chunk order).
        positions: int64 ``[B, A]`` RoPE position of each compressed-area token.
        values: ``HostKV`` of the candidates' values in host memory, ``Mmax`` rows of
            ``chunk_size * D`` per segment (values only: the keys are rebuilt on the device).
        num_candidates, picks: per segment ``M`` and ``k`` (``HostDevice``: host and device copies).
        prompt_tokens, chunks: host int64 ``[B]``: real prompt tokens and compressed chunks per row.
        outliers: bool ``[B, H, max C]`` the outlier chunks (prefill-time record, for inspection).
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self._refresh()

    def _refresh(self) -> None:
        self.max_picks = int(self.picks.h.max()) if self.picks.h.size else 0
        self.work_dtype = torch.promote_types(self.dtype, torch.float32)  # float32, float64 for a float64 model
        self.seg_row = to_device(np.repeat(np.arange(self.num_rows), self.num_heads), self.device)

    @property
    def num_segments(self) -> int:
        return self.num_rows * self.num_heads

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, policy: ShadowKVPolicy, ctx: PrefillContext, n_h, chunks_h, cand_h, picks_h, positions,
              rotary: Rotary) -> tuple[ShadowKVLayer, torch.Tensor]:
        key, value, valid = ctx.key, ctx.value, ctx.valid
        B, H, L, D = key.shape
        S, cs, dev, dtype = B * H, policy.chunk_size, key.device, key.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        nmax, Cmax, Mmax = int(n_h.max()), int(chunks_h.max()), int(cand_h.max())
        A = Cmax * cs
        n, C, M = (to_device(x, dev) for x in (n_h, chunks_h, cand_h))
        # The j-th real token of each row at column j (left padding or any other mask).
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[:, :nmax]  # [B, nmax]
        real = torch.arange(nmax, device=dev)[None, :] < n[:, None]  # [B, nmax]
        idx4 = order[:, None, :, None].expand(B, H, nmax, D)
        keys, values = key.gather(2, idx4), value.gather(2, idx4)  # [B, H, nmax, D]
        pos = positions.to(dev).long().gather(1, order)  # [B, nmax]

        # Landmarks and outliers over the compressed area's chunks (post-RoPE keys, per KV head).
        area = keys[:, :, :A].to(work).reshape(B, H, Cmax, cs, D)
        means = area.mean(3)  # [B, H, Cmax, D]
        similarity = F.cosine_similarity(means[:, :, :, None, :], area, dim=-1)  # [B, H, Cmax, cs]
        min_similarity = similarity.amin(-1)
        chunk_ok = (torch.arange(Cmax, device=dev)[None, :] < C[:, None])[:, None, :]  # [B, 1, Cmax]
        outliers = torch.zeros(B, H, Cmax, dtype=torch.bool, device=dev)
        if policy.outlier_chunks:
            lowest = min_similarity.masked_fill(~chunk_ok, float("inf")).topk(policy.outlier_chunks, -1, largest=False)
            outliers.scatter_(-1, lowest.indices, True)
            outliers &= chunk_ok
        candidate = chunk_ok & ~outliers  # exactly M[b] per (b, h)
        chunk_index = torch.argsort((~candidate).to(torch.int8), dim=-1, stable=True)[..., :Mmax]  # [B, H, Mmax]
        cand_ok = torch.arange(Mmax, device=dev)[None, None, :] < M[:, None, None]
        chunk_index = torch.where(cand_ok, chunk_index, torch.zeros_like(chunk_index))
        landmarks = means.gather(2, chunk_index[..., None].expand(B, H, Mmax, D)) * cand_ok[..., None]

        # Exact in the store: the local tail (and whole rows left uncompressed) and the outlier chunks.
        j = torch.arange(nmax, device=dev)
        in_area = j[None, :] < (C * cs)[:, None]  # [B, nmax]
        chunk_of = (j // cs).clamp(max=max(Cmax - 1, 0))
        outlier_token = outliers.gather(2, chunk_of[None, None, :].expand(B, H, nmax)) & in_area[:, None, :]
        keep_real = real[:, None, :] & (~in_area[:, None, :] | outlier_token)  # [B, H, nmax]
        keep = torch.zeros(B, H, L, dtype=torch.bool, device=dev)
        keep.scatter_(2, order[:, None, :].expand(B, H, nmax), keep_real)

        # Truncated SVD of the pre-RoPE keys, one per layer and row over all KV heads side by side.
        cos, sin = rotary.cos_sin(pos, dtype)  # what the model rotated with
        pre = rotary.invert(keys.to(work), cos[:, None], sin[:, None]) * real[:, None, :, None]
        X = pre.permute(0, 2, 1, 3).reshape(B, nmax, H * D)  # padding rows are zero: per-row SVDs
        r = policy.rank_for(H * D, nmax)
        U, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
        U_area = U[:, :A, :r].to(dtype).contiguous()
        SV = (sigma[:, :r, None] * Vh[:, :r]).view(B, r, H, D).permute(0, 2, 1, 3).reshape(S, r, D)

        # The candidates' values go to host memory, chunk after chunk ([S * Mmax, cs * D] rows).
        chunk_values = values[:, :, :A].reshape(B, H, Cmax, cs * D)
        cand_values = chunk_values.gather(2, chunk_index[..., None].expand(B, H, Mmax, cs * D))
        layer = cls(
            chunk_size=cs, num_rows=B, num_heads=H, head_dim=D, dtype=dtype, device=dev, rank=r,
            area=A, max_candidates=Mmax, rotary=rotary,
            U=U_area, SV=SV.to(dtype).contiguous(), landmarks=landmarks.reshape(S, Mmax, D).to(dtype),
            chunk_index=chunk_index.reshape(S, Mmax).contiguous(), positions=pos[:, :A].contiguous(),
            values=HostKV(np.full(S, Mmax), range(H), dev, v=cand_values.reshape(S * Mmax, cs * D)),
            num_candidates=HostDevice(np.repeat(cand_h, H), dev), picks=HostDevice(np.repeat(picks_h, H), dev),
            prompt_tokens=n_h.copy(), chunks=chunks_h.copy(), outliers=outliers,
        )
        return layer, keep

    # ------------------------------------------------------------------ accounting
    def device_nbytes(self) -> int:
        """Device bytes beside the store: factors, landmarks, their chunk indices, positions, counts."""
        tensors = (self.U, self.SV, self.landmarks, self.chunk_index, self.positions, self.num_candidates.d,
                   self.picks.d)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ per step
    def chunk_scores(self, q: torch.Tensor, scaling: float, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Landmark scores of queries ``q [S, G, T, D]``: ``softmax(q . landmark * scaling)`` over each
        segment's landmarks per query head and token, summed over (valid) tokens, max over the group:
        float32 ``[S, Mmax]``, -1 past a segment's candidates (never chosen before a real one)."""
        S, G, T, D = q.shape
        w = self.work_dtype
        scores = torch.bmm(q.reshape(S, G * T, D).to(w), self.landmarks.to(w).transpose(1, 2)) * scaling
        cand_ok = torch.arange(self.max_candidates, device=q.device)[None, :] < self.num_candidates.d[:, None]
        scores = scores.masked_fill(~cand_ok[:, None, :], torch.finfo(w).min)  # no NaN when empty
        probs = torch.softmax(scores, dim=-1).view(S, G, T, -1)
        if token_valid is not None:
            probs = probs * token_valid[:, None, :, None]
        return probs.sum(2).amax(1).masked_fill(~cand_ok, -1.0)

    def choose(self, q: torch.Tensor, scaling: float, token_valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates each segment reads: ``picks`` int64 ``[S, k]`` (indices into its landmarks,
        best first) and ``ok`` bool ``[S, k]`` (False past the segment's own budget)."""
        k = self.max_picks
        picks = self.chunk_scores(q, scaling, token_valid).topk(k, dim=-1).indices
        ok = torch.arange(k, device=picks.device)[None, :] < self.picks.d[:, None]
        return picks, ok

    def rebuild_keys(self, picks: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys of the chosen candidates ``[S, k]``: ``U[token] @ SV`` rotated at the tokens'
        positions, ``[S, k * chunk_size, D]`` in the model's dtype."""
        S, k = picks.shape
        cs = self.chunk_size
        chunk = self.chunk_index.gather(1, picks)  # [S, k]
        token = (chunk[:, :, None] * cs + torch.arange(cs, device=chunk.device)).reshape(S, k * cs)
        flat = self.seg_row[:, None] * self.area + token  # into U / positions of the segment's row
        u = self.U.reshape(-1, self.rank)[flat]  # [S, k * cs, r]
        pre = torch.bmm(u, self.SV)  # [S, k * cs, D]
        cos, sin = self.rotary.cos_sin(self.positions.reshape(-1)[flat], self.dtype)
        w = self.work_dtype
        return self.rotary.apply(pre.to(w), cos.to(w), sin.to(w)).to(self.dtype)

    def fetch_values(self, picks: torch.Tensor) -> torch.Tensor:
        """Values of the chosen candidates from host memory: ``[S, k * chunk_size, D]`` on the device."""
        S, k = picks.shape
        _, values = self.values.gather(picks)  # rows picks[s] of segment s
        return values.view(S, k * self.chunk_size, self.head_dim)

    def extra_tokens(self, q: torch.Tensor, scaling: float, token_valid=None):
        """The chosen chunks as extra attention tokens: ``(key, value [S, k * cs, D], valid [S, k * cs])``."""
        picks, ok = self.choose(q, scaling, token_valid)
        values = self.fetch_values(picks)
        keys = self.rebuild_keys(picks)
        valid = ok[:, :, None].expand(*ok.shape, self.chunk_size).reshape(ok.shape[0], -1)
        return keys, values, valid

    # ------------------------------------------------------------------ batch
    def select_rows(self, rows: np.ndarray) -> None:
        """Keep, reorder or repeat rows (beam search, batch expansion): row i becomes old row ``rows[i]``."""
        H = self.num_heads
        segs = (rows[:, None] * H + np.arange(H)).reshape(-1)
        rows_d, segs_d = to_device(rows, self.device), to_device(segs, self.device)
        self.U, self.positions = self.U[rows_d], self.positions[rows_d]
        self.SV, self.landmarks, self.chunk_index = self.SV[segs_d], self.landmarks[segs_d], self.chunk_index[segs_d]
        self.outliers = self.outliers[rows_d]
        self.num_candidates = HostDevice(self.num_candidates.h[segs], self.device)
        self.picks = HostDevice(self.picks.h[segs], self.device)
        self.values.select_rows(rows)
        self.prompt_tokens, self.chunks = self.prompt_tokens[rows], self.chunks[rows]
        self.num_rows = len(rows)
        self._refresh()


ShadowKVCache = ShadowKVPolicy.cache_class

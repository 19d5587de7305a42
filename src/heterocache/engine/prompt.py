"""A layer's prompt while it arrives in pieces (``generate(prefill_chunk_size=N)``, or several
forward calls before the first decode step): what the layer holds until the prompt ends.

The rule (``docs/prefill.md``): a layer's prompt is *open* from its first multi-token update until
the prompt ends, at the first single-token step (the first decode step) or at
``RaggedCache.end_prompt()``. While it is open:

- ``"exact"`` (default): the pieces are kept whole (keys, values, which tokens are real, the last
  ``Policy.prompt_queries`` queries) and each piece attends to every earlier token exactly as a
  ``DynamicCache`` would; when the prompt ends the policy compresses it once, as if it had come
  in one piece.
- ``"bounded"``: after each piece the layer keeps what the policy's budget allows for the prompt
  seen so far, chosen among the tokens it kept and the new piece (per KV head); the policy's
  ``on_prefill_done`` runs when the prompt ends.

Sliding-window layers keep only the tokens a later query can see (``W - 1``) in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..attention.extend import extend_attention
from ..store.ragged import RaggedKVStore

if TYPE_CHECKING:
    from .cache import RaggedLayer

PREFILL_MODES = ("exact", "bounded")


@dataclass
class OpenPrompt:
    """What a layer holds of a prompt that has not ended.

    Attributes:
        key, value: ``[B, H, n, D]`` the prompt's tokens so far (exact mode), or only the newest
            ``W - 1`` on a sliding-window layer; None in bounded mode on a full layer (the layer's
            store holds the kept tokens).
        valid: bool ``[B, n]`` real tokens among ``key``'s columns.
        positions: int64 ``[n]`` logical position of each column.
        length: tokens of the prompt so far (real and padding).
        real: int64 ``[B]`` real tokens of the prompt so far.
        position_ids: the RoPE positions of the prompt so far, ``[B or 1, length]``; None when a
            piece came without them.
        queries: ``[B, Hq, <= Q, D]`` the last ``Q = Policy.prompt_queries`` queries (all of them
            when Q is None); full-attention layers only.
        scaling: the layer's softmax scale.
        config: the model's config.
        host_key, host_value, host_valid: bounded mode with ``Policy.bounded_prompt_copy``: every
            piece's keys, values and validity in host memory (CPU; pinned when the layer is on CUDA).
    """

    valid: torch.Tensor
    positions: torch.Tensor
    length: int
    real: torch.Tensor
    scaling: float
    config: object = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    host_key: torch.Tensor | None = None
    host_value: torch.Tensor | None = None
    host_valid: torch.Tensor | None = None
    pieces: int = 0

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    def nbytes(self) -> int:
        """Device bytes held for the open prompt (keys, values, queries)."""
        tensors = (self.key, self.value, self.queries)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def add(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, new_valid: torch.Tensor,
            positions: torch.Tensor, length: int, position_ids, keep_queries: int | None,
            window: int | None) -> None:
        """Record one piece (after it was attended). ``key``/``value``: every column to keep (the
        earlier ones and the piece's) or None (bounded mode keeps them in the store); ``length``:
        the prompt's tokens with this piece; ``keep_queries``: how many last queries to keep
        (None: all, 0: none)."""
        self.valid = torch.cat([self.valid, new_valid], -1) if self.pieces else new_valid
        self.positions = torch.cat([self.positions, positions]) if self.pieces else positions
        self.length = length
        self.real = self.real + new_valid.sum(-1)
        if self.pieces == 0 or self.position_ids is not None:
            self.position_ids = None if position_ids is None else (
                position_ids if self.pieces == 0 else torch.cat([self.position_ids, position_ids], -1))
        self.key, self.value = key, value
        if window is not None and key is not None:  # a sliding layer: what a later query can see
            start = max(0, self.positions.shape[0] - (window - 1))
            if start:
                self.key, self.value = key[:, :, start:].contiguous(), value[:, :, start:].contiguous()
                self.valid, self.positions = self.valid[:, start:], self.positions[start:]
        if window is None:
            self.queries = last_queries(self.queries, query, keep_queries)
        self.pieces += 1

    def add_host_copy(self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor) -> None:
        """Append a piece to the host copy of the whole prompt (bounded mode)."""
        pin = key.device.type == "cuda"
        parts = [_to_host(t, pin) for t in (key, value, valid)]
        if self.host_key is None:
            self.host_key, self.host_value, self.host_valid = parts
        else:
            self.host_key = torch.cat([self.host_key, parts[0]], 2)
            self.host_value = torch.cat([self.host_value, parts[1]], 2)
            self.host_valid = torch.cat([self.host_valid, parts[2]], 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep, reorder or repeat batch rows (row i becomes old row ``rows[i]``)."""
        def pick(t, dim=0):
            if t is None or t.shape[dim] == 1 and t is self.position_ids:  # positions broadcast over rows
                return t
            return t.index_select(dim, rows.to(t.device).long())

        self.valid, self.real = pick(self.valid), pick(self.real)
        self.key, self.value, self.queries = pick(self.key), pick(self.value), pick(self.queries)
        if self.position_ids is not None:  # [B or 1, L], or [3, B, L] (multi-axis RoPE)
            self.position_ids = pick(self.position_ids, self.position_ids.dim() - 2)
        self.host_key, self.host_value, self.host_valid = pick(self.host_key), pick(self.host_value), pick(
            self.host_valid)


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if pin else host


def last_queries(kept: torch.Tensor | None, query: torch.Tensor, count: int | None) -> torch.Tensor:
    """The last ``count`` queries of the prompt so far (own memory, not a view of the piece's)."""
    if count is None:
        return query if kept is None else torch.cat([kept, query], 2)
    if count <= 0:
        return query.new_empty(*query.shape[:2], 0, query.shape[-1])
    q = query.shape[2]
    if q >= count or kept is None or kept.shape[2] == 0:
        return query[:, :, -count:].clone()
    return torch.cat([kept[:, :, -(count - q):], query], 2)


def piece_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """The mask of a piece over the ``kv_len`` columns a layer holds (the last ones of the model's
    mask), or an explicit causal one where the model gave none and earlier tokens exist (SDPA's
    ``is_causal`` would align a short query block with the *first* keys)."""
    if attention_mask is not None:
        return attention_mask[..., -kv_len:] if attention_mask.shape[-1] != kv_len else attention_mask
    if kv_len == q_len:
        return None
    rows = torch.arange(kv_len - q_len, kv_len, device=device)
    return (torch.arange(kv_len, device=device)[None, :] <= rows[:, None])[None, None]


def right_aligned(store: RaggedKVStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The store's tokens per segment as dense ``[B, H, M, D]`` keys and values with every
    segment's newest token in the last column (the segments' first columns padded, like left
    padding): a bounded prefill's view of a layer, whose last columns are the newest piece.

    Returns:
        ``key, value [B, H, M, D]``, ``valid bool [B, H, M]``, ``positions int64 [B * H, M]`` (-1
        where not valid).
    """
    B, H, D = store.num_rows, store.num_heads, store.head_dim
    M = store.max_length()
    col = torch.arange(M, device=store.device)
    first = M - store.length  # [S] the first column a segment fills
    valid = col[None, :] >= first[:, None]
    idx = torch.where(valid, store.start[:, None] + col[None, :] - first[:, None], torch.zeros_like(col)[None, :])
    pos = torch.where(valid, store.pos[idx].long(), torch.full_like(idx, -1))
    return (store.k[idx].view(B, H, M, D), store.v[idx].view(B, H, M, D), valid.view(B, H, M), pos)


class PromptPieces:
    """The part of ``RaggedCache`` that takes a prompt in pieces (the module docstring): the
    ``prefill`` mode, ``end_prompt`` and what ``attend`` does with a piece. It calls the cache's
    ``_resolve_shard``, ``_context``, ``_compress`` and ``_fill_window``."""

    @property
    def prefill(self) -> str:
        """How a prompt arriving in pieces is compressed: "exact" or "bounded" (see the class)."""
        return self._prefill

    @prefill.setter
    def prefill(self, mode: str) -> None:
        if mode not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(map(repr, PREFILL_MODES))}, got {mode!r}")
        if mode == "bounded" and not self.policy.bounded_prefill:
            raise ValueError(
                f"{self.policy.name} cannot compress a prompt as its pieces arrive (prefill='bounded'): it needs the "
                "whole prompt at once; use prefill='exact'"
            )
        if any(layer.prompt is not None for layer in getattr(self, "layers", ())):
            raise RuntimeError("the prefill mode cannot change while a prompt is open")
        self._prefill = mode

    def end_prompt(self) -> None:
        """End the prompt: compress every layer whose prompt is still open (in layer order), as
        the first decode step does. Call it after prefilling a context with forward calls when the
        next multi-token call is a new turn, not more prompt (a question after a document), or to
        read the compressed cache before generating. ``generate()`` needs no call. No-op when no
        prompt is open."""
        for layer in self.layers:
            if layer.prompt is not None:
                self._end_layer_prompt(layer)

    # ------------------------------------------------------------------ a prompt in pieces
    def _prompt_piece(self, layer: RaggedLayer, module, query, key, value, attention_mask, scaling, dropout,
                      positions, config, kwargs):
        """Attend one piece of the layer's prompt and record it (``heterocache.engine.prompt``)."""
        B, H, q, D = key.shape
        first = layer.prompt is None
        if first:
            self._resolve_shard(key, config, module)
            layer.prompt = OpenPrompt(valid=None, positions=None, length=0,
                                      real=torch.zeros(B, dtype=torch.long, device=key.device),
                                      scaling=scaling, config=config)
        prompt, window, idx = layer.prompt, layer.sliding_window, layer.policy_idx
        new_valid = key_validity(attention_mask, key)
        if new_valid is None:
            new_valid = torch.ones(B, q, dtype=torch.bool, device=key.device)
        bounded = self.prefill == "bounded" and window is None
        if bounded and not first:  # over the kept tokens: a later turn's attention
            out = extend_attention(layer.store, query, key, value, new_valid, scaling, positions=positions)
            k_all = v_all = None
        else:
            k_all = key if prompt.key is None else torch.cat([prompt.key, key], 2)
            v_all = value if prompt.value is None else torch.cat([prompt.value, value], 2)
            mask = piece_mask(attention_mask, q, k_all.shape[2], key.device)
            out, _ = sdpa_attention_forward(module, query, k_all, v_all, mask, scaling=scaling, dropout=dropout,
                                            **kwargs)
            if window is None and not bounded:
                valid_all = new_valid if first else torch.cat([prompt.valid, new_valid], -1)
                self.policy.observe_prompt_piece(idx, query, k_all, valid_all, scaling)
        keep_queries = self.policy.prompt_queries
        prompt.add(query, None if bounded else k_all, None if bounded else v_all, new_valid, positions, layer.seen,
                   kwargs.get("position_ids"), keep_queries, window)
        if bounded:
            if self.policy.bounded_prompt_copy:
                prompt.add_host_copy(key, value, new_valid)
            self._bounded_piece(layer, key, value, new_valid, positions, first)
        return out

    def _bounded_piece(self, layer: RaggedLayer, key, value, new_valid, positions, first: bool) -> None:
        """Keep the budget of the prompt seen so far, among the kept tokens and the new piece."""
        prompt = layer.prompt
        if first:
            ctx = self._context(layer, prompt.queries, key, value, new_valid, prompt.scaling, prompt.config)
            self._compress(layer, ctx, positions, done=False)
            return
        layer.store.append(key, value, positions, new_valid)
        k, v, head_valid, pos = right_aligned(layer.store)
        ctx = self._context(layer, prompt.queries, k, v, head_valid.any(1), prompt.scaling, prompt.config,
                            head_valid=head_valid, prompt_lengths=prompt.real)
        self._compress(layer, ctx, pos, done=False)

    def _end_layer_prompt(self, layer: RaggedLayer) -> None:
        """The layer's prompt ended: compress it (exact) or hand it over (bounded)."""
        prompt, layer.prompt = layer.prompt, None
        if layer.sliding_window is not None:
            self._fill_window(layer, prompt.key, prompt.value, prompt.valid, prompt.positions, prompt.length)
            return
        if layer.store is None:  # exact: the whole prompt at once
            ctx = self._context(layer, prompt.queries, prompt.key, prompt.value, prompt.valid, prompt.scaling,
                                prompt.config, prompt.position_ids)
            self._compress(layer, ctx, prompt.positions)
            return
        if prompt.host_key is not None:
            # Bounded, with the whole prompt in host memory (a policy whose heads keep a host copy):
            # choose once more from all of it with the prompt's last queries, as the exact prefill
            # does (only this layer's prompt is on the device, for this choice), so a question at the
            # prompt's end finds what the earlier pieces dropped.
            device = layer.store.device
            key, value, valid = (t.to(device, non_blocking=True)
                                 for t in (prompt.host_key, prompt.host_value, prompt.host_valid))
            ctx = self._context(layer, prompt.queries, key, value, valid, prompt.scaling, prompt.config,
                                prompt.position_ids)
            layer.store = None
            self._compress(layer, ctx, prompt.positions.to(device))
            return
        # bounded: what the layer kept
        k, v, head_valid, _ = right_aligned(layer.store)
        ctx = self._context(layer, prompt.queries, k, v, head_valid.any(1), prompt.scaling, prompt.config,
                            head_valid=head_valid, prompt_lengths=prompt.real)
        self.policy.on_prefill_done(layer.policy_idx, layer.store, ctx)

    def _fill_window(self, layer: RaggedLayer, key, value, valid, positions, length: int) -> None:
        """Fill a sliding layer with what a future query can see: the real tokens at positions
        ``> length - W`` (the newest ``W - 1`` of a ``length``-token prompt). No policy is asked:
        nothing here is compressed.

        Raises:
            NotImplementedError: a row whose window holds padding after a real token (padding
                other than left padding): the decode step drops one token per step by count.
        """
        B, H, L, D = key.shape
        keep = valid & (positions > length - layer.sliding_window)[None, :]  # [B, L]
        keep_h = keep.cpu().numpy()  # prefill: host reads are fine here
        if L > 1 and (keep_h[:, 1:] < keep_h[:, :-1]).any():
            raise NotImplementedError(
                f"sliding-window layer {layer.layer_idx}: a row has padding after real tokens inside the window; "
                "only left padding is supported"
            )
        store = RaggedKVStore(B, H, D, key.dtype, key.device, self.block_size, self.reserve)
        store.fill(key, value, keep[:, None, :].expand(B, H, L), positions)
        layer.store = store


def key_validity(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """Which of the ``q`` new tokens are real (not padding), read from an sdpa mask's diagonal:
    new token i (column ``kv - q + i``) is visible to its own query exactly when it is real, on a
    full layer as on a sliding one (the last query row would also hide what is outside a window).

    Args:
        mask: bool ``[B, 1, q, kv]`` (True = attend) or None (no padding).
        key: any ``[B, ...]`` tensor (for the batch size and device).

    Returns:
        bool ``[B, q]`` or None.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:  # additive float mask (eager-style): 0 = attend
        mask = mask == 0
    q, kv = mask.shape[-2], mask.shape[-1]
    diagonal = torch.diagonal(mask[:, 0, :, kv - q :], dim1=-2, dim2=-1)
    return diagonal.expand(key.shape[0], -1).clone()



"""The transformers ``Cache`` whose storage is really per head.

``RaggedCache`` is a thin container (like transformers' own caches): one ``RaggedLayer`` per model
layer, each holding a ``RaggedKVStore``, and a ``Policy`` that decides what is kept. The model's
attention must be ``"heterocache"`` (see ``heterocache.attention``): ``update()`` only records the
new keys and values and hands them back unchanged; the attention function computes the output
from the ragged store and then commits the new tokens (after the prefill's attention has run, so
the policy can score the prompt with its queries).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import attention as _attention
from .budget import check_budget
from .memory import MemoryReport, build_memory_report
from .policies import FullKVPolicy, Policy, PrefillContext, SnapKVPolicy
from .ragged_attention import DecodePlanner, decode_step, extend_attention
from .store import RaggedKVStore


class RaggedLayer(CacheLayerMixin):
    """One layer of a ``RaggedCache``: its store and its logical length.

    ``seen`` counts the tokens the layer has been given (the logical sequence length, which
    positions and masks depend on); the store may hold fewer per head.
    """

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, layer_idx: int, block_size: int = 64, reserve: int = 128):
        super().__init__()
        self.layer_idx = layer_idx
        self.block_size, self.reserve = block_size, reserve
        self.store: RaggedKVStore | None = None
        self.seen = 0

    # -- CacheLayerMixin contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.store.num_rows if self.store is not None else -1

    def reset(self) -> None:
        self.store = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self.seen == 0:
            return
        self.seen = max(0, self.seen + tokens_to_remove)
        if self.store is not None:
            self.store.truncate_positions(self.seen)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.select_rows(torch.as_tensor(indices, device=self.store.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            rows = torch.arange(self.store.num_rows, device=self.store.device).repeat_interleave(repeats)
            self.store.select_rows(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


class RaggedCache(Cache):
    """A KV cache with one length per (batch row, layer, KV head), driven by a ``Policy``.

    Use it with a model whose attention is ``"heterocache"``::

        import heterocache
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="heterocache")
        out = model.generate(**inputs, past_key_values=SnapKVCache(budget=0.25))

    Args:
        policy: what to keep (default: ``FullKVPolicy``, keeps everything).
        block_size: slot alignment of each head's segment in the packed buffers (default 64).
        reserve: free slots reserved per head for decoded tokens when (re)allocating (default 128).

    Multi-turn: pass the same cache to a second ``generate()`` with the whole conversation; only the
    new tokens are processed and appended (not compressed). Beam search, ``crop`` and batch
    repeat/select are supported: they permute, repeat or truncate the stored heads.
    """

    def __init__(self, policy: Policy | None = None, block_size: int = 64, reserve: int = 128):
        super().__init__(layers=[])
        self.policy = policy if policy is not None else FullKVPolicy()
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a heterocache Policy, got {type(self.policy).__name__}")
        self.block_size, self.reserve = block_size, reserve
        self._pending: _attention.PendingUpdate | None = None
        self.is_croppable_policy = self.policy.croppable
        self.planner = DecodePlanner()
        # The device half of a layer's decode step; replaceable by a compiled version of itself.
        self.decode_step = decode_step

    # ------------------------------------------------------------------ transformers Cache API
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self._check_attention_used()
        while len(self.layers) <= layer_idx:
            self.layers.append(RaggedLayer(len(self.layers), self.block_size, self.reserve))
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        self._pending = _attention.PendingUpdate(self, layer_idx, keys)
        _attention.set_pending(self._pending)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self._check_attention_used()
        return super().get_seq_length(layer_idx)

    @property
    def is_croppable(self) -> bool:
        return self.is_croppable_policy

    def reset(self):
        super().reset()
        self.policy.reset()
        self._pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.policy.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.policy.select_rows(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int):
        rows = self.batch_size
        super().batch_repeat_interleave(repeats)
        if rows > 0:
            self.policy.select_rows(torch.arange(rows).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_croppable_policy:
            raise NotImplementedError(
                f"{self.policy.name} evicts tokens while decoding, so crop cannot restore the cache; "
                "assisted/speculative decoding is not supported with this method"
            )
        super().crop(tokens_to_remove)

    # ------------------------------------------------------------------ attention entry point
    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """Compute the layer's attention output and commit the new tokens (called by the
        ``heterocache`` attention function for the update this cache just handed out).

        Args:
            query: ``[B, Hq, q, D]``; key, value: ``[B, H, q, D]`` new tokens.
            attention_mask: the sdpa-style boolean mask ``[B, 1, q, kv]`` or None.

        Returns:
            ``([B, q, Hq, D], None)``.
        """
        self._pending = None
        layer = self.layers[module.layer_idx]
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        q_len = query.shape[2]
        positions = torch.arange(layer.seen - q_len, layer.seen, device=key.device)
        if layer.store is None:
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
            valid = _key_validity(attention_mask, key)
            self._fill(layer, query, key, value, valid, positions, scaling, getattr(module, "config", None))
            return out, None
        if q_len > 1:
            self.policy.before_extend(layer.layer_idx, layer.store, query, scaling)
        self.policy.before_attention(layer.layer_idx)
        if q_len == 1:
            # Host half (growth, mirror, plan: once per step and layout), then the device half.
            layer.store.begin_decode_append()
            plan = self.planner.plan(layer.store, layer.seen)
            out = self.decode_step(layer.store, key, value, positions, query, scaling, plan)
            self.policy.on_decode(layer.layer_idx, layer.store, query, scaling)
            return out, None
        new_valid = None if attention_mask is None else _key_validity(attention_mask[..., -q_len:], key)
        out = extend_attention(layer.store, query, key, value, new_valid, scaling)
        layer.store.append(key, value, positions, new_valid)
        self.policy.on_extend(layer.layer_idx, layer.store, query, scaling)
        return out, None

    def ingest_prefill(self, layer_idx: int, query, key, value, valid, scaling: float, config=None) -> None:
        """Fill an empty layer from a prefill attended elsewhere (what ``attend`` does at prefill,
        without computing the attention output): lets one forward pass fill several caches.

        Args:
            layer_idx: the layer; it must hold no tokens yet.
            query: ``[B, Hq, L, D]``; key, value: ``[B, H, L, D]`` the whole prompt (after RoPE).
            valid: bool ``[B, L]`` real tokens, or None (no padding).
            scaling: the layer's softmax scale.
            config: the model's config (policies read the layer count from it).

        Raises:
            ValueError: the layer already holds tokens.
        """
        while len(self.layers) <= layer_idx:
            self.layers.append(RaggedLayer(len(self.layers), self.block_size, self.reserve))
        layer = self.layers[layer_idx]
        if layer.seen:
            raise ValueError(f"layer {layer_idx} already holds {layer.seen} tokens; ingest_prefill fills an empty one")
        layer.update(key, value)
        positions = torch.arange(key.shape[-2], device=key.device)
        self._fill(layer, query, key, value, valid, positions, scaling, config)

    def _fill(self, layer: RaggedLayer, query, key, value, valid, positions, scaling, config=None) -> None:
        B, H, L, D = key.shape
        if valid is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=key.device)
        num_layers = getattr(config, "num_hidden_layers", None)
        ctx = PrefillContext(layer.layer_idx, query, key, value, valid, scaling, num_layers, config)
        plan = self.policy.plan(ctx)
        keep = self.policy.select(ctx, plan)
        kept = keep.sum(-1)
        if keep.shape != (B, H, L) or not torch.equal(kept, plan.to(kept.device)):
            raise RuntimeError(
                f"policy {self.policy.name} selected {kept.tolist()} tokens for layer {layer.layer_idx}, "
                f"its plan says {plan.tolist()}"
            )
        if bool((keep & ~valid[:, None, :]).any()):
            raise RuntimeError(f"policy {self.policy.name} kept padding tokens in layer {layer.layer_idx}")
        store = RaggedKVStore(B, H, D, key.dtype, key.device, self.block_size, self.reserve)
        store.fill(key, value, keep, positions)
        layer.store = store
        self.policy.on_prefill_done(layer.layer_idx, store, ctx)

    def _check_attention_used(self) -> None:
        if self._pending is not None:
            self._pending = None
            raise _attention.AttentionNotEnabledError(
                f"{type(self).__name__} keeps a ragged per-head KV cache that only the 'heterocache' attention "
                "can read, but the model ran another attention on it. Load the model with "
                "`attn_implementation=\"heterocache\"` (after `import heterocache`) or call "
                "`heterocache.enable(model)` first."
            )

    # ------------------------------------------------------------------ inspection
    def memory_report(self) -> MemoryReport:
        """Bytes held on the accelerator and in host memory, per layer and per head role, next to
        what a DynamicCache would hold for the same tokens."""
        return build_memory_report(self)

    def stored_tokens(self) -> list[torch.Tensor]:
        """Stored tokens per layer: int64 ``[B, H]`` each."""
        return [layer.store.lengths().clone() for layer in self.layers if layer.store is not None]


def _key_validity(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """Which key columns are real tokens, read from the last query row of an sdpa mask.

    Args:
        mask: bool ``[B, 1, q, kv]`` (True = attend) or None (no padding).
        key: any ``[B, ...]`` tensor (for the batch size and device).

    Returns:
        bool ``[B, kv]`` or None.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:  # additive float mask (eager-style): 0 = attend
        mask = mask == 0
    return mask[:, 0, -1, :].expand(key.shape[0], -1).clone()


class FullKVCache(RaggedCache):
    """Keeps every token on the ragged engine: the uncompressed reference.

    Gives exactly the tokens of DynamicCache + sdpa.
    """

    def __init__(self, block_size: int = 64, reserve: int = 128):
        super().__init__(FullKVPolicy(), block_size, reserve)


class SnapKVCache(RaggedCache):
    """SnapKV with a uniform budget: every KV head keeps ``round(budget * prompt)`` prompt tokens.

    Args:
        budget: fraction of the prompt KV kept, in (0, 1] (default 0.25).
        **policy_kwargs: ``window``, ``kernel``, ``pooling``, ``gqa_reduce`` (see ``SnapKVPolicy``).
    """

    def __init__(self, budget: float = 0.25, block_size: int = 64, reserve: int = 128, **policy_kwargs):
        super().__init__(SnapKVPolicy(budget=check_budget(budget), **policy_kwargs), block_size, reserve)

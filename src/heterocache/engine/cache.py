"""The transformers ``Cache`` whose storage is really per head.

``RaggedCache`` is a thin container (like transformers' own caches): one ``RaggedLayer`` per model
layer, each holding a ``RaggedKVStore``, and a ``Policy`` that decides what is kept. The model's
attention must be ``"heterocache"`` (see ``heterocache.engine.integration``): ``update()`` only records the
new keys and values and hands them back unchanged; the attention function computes the output
from the ragged store and then commits the new tokens (after the prefill's attention has run, so
the policy can score the prompt with its queries).

Sliding-window layers (``config.layer_types`` "sliding_attention", e.g. Gemma 3's local layers, or
every layer of a Mistral with ``sliding_window`` set) are served exactly and never compressed: a
query at position ``p`` sees positions ``p - W + 1 .. p`` (transformers' sliding mask), so between
steps the layer stores the ``W - 1`` newest tokens of each row, as transformers'
``DynamicSlidingWindowLayer`` does, and a decode step attends over those plus the new token, then
drops the oldest. The policy sees only the full-attention layers, numbered from 0 (see
``heterocache.engine.architectures``), and its budget is counted over them alone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention.decode import decode_attention, decode_step, selected_decode_attention
from ..attention.extend import extend_attention
from ..attention.plan import DecodePlanner
from ..policy.base import FullKVPolicy, Policy, PrefillContext
from ..store.ragged import RaggedKVStore
from . import integration as _attention
from .architectures import ArchitectureSpec, check_architecture, check_attention_call
from .memory import MemoryReport, build_memory_report
from .parallel import KVShard, TensorParallelError, kv_head_shard
from .prompt import OpenPrompt, PromptPieces, key_validity, last_queries


class RaggedLayer(CacheLayerMixin):
    """One layer of a ``RaggedCache``: its store and its logical length.

    ``seen`` counts the tokens the layer has been given (the logical sequence length, which
    positions and masks depend on); the store may hold fewer per head. ``prompt`` is the layer's
    prompt while it is open (``heterocache.engine.prompt``): the store is None until it ends
    (exact prefill) or holds what is kept so far (bounded prefill).

    Attributes:
        sliding_window: ``W`` of a sliding-window layer (it stores at most ``W - 1`` tokens per row
            between steps, ``W`` while a step attends), None for a full-attention layer.
        policy_idx: the layer's index among the compressible (full) layers, what the policy calls
            it; None for a sliding layer (the policy never sees it).
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
        self.configured = False  # sliding_window and policy_idx set from the model's config
        self.sliding_window: int | None = None
        self.policy_idx: int | None = layer_idx
        self._oldest: torch.Tensor | None = None  # int64 zeros [S]: "drop column 0" of every segment
        self.prompt: OpenPrompt | None = None

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
        if self.store is not None:
            return self.store.num_rows
        return self.prompt.num_rows if self.prompt is not None else -1

    def reset(self) -> None:
        self.store = None
        self.prompt = None
        self.seen = 0
        self.is_initialized = False
        # The layout (sliding window, the policy's index of the layer) is read again from the next
        # model's config: a reset cache may serve another model.
        self.configured = False
        self.sliding_window, self.policy_idx, self._oldest = None, self.layer_idx, None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self.seen == 0:
            return
        if self.prompt is not None:
            raise NotImplementedError(
                f"layer {self.layer_idx}: crop while a prompt is being prefilled in pieces (it keeps only the last "
                "queries it needs); crop after the prompt ended"
            )
        if self.sliding_window is not None and self.seen >= self.sliding_window:
            # Like DynamicSlidingWindowLayer: the tokens a cropped sequence needs again are gone.
            raise NotImplementedError(
                f"layer {self.layer_idx} is a sliding-window layer that already dropped the tokens older than its "
                f"window ({self.sliding_window}); crop cannot restore them"
            )
        self.seen = max(0, self.seen + tokens_to_remove)
        if self.store is not None:
            self.store.truncate_positions(self.seen)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.prompt is not None:
            self.prompt.select_rows(torch.as_tensor(indices))
        if self.store is not None:
            self.store.select_rows(torch.as_tensor(indices, device=self.store.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.batch_size
        if rows > 0:
            self.batch_select_indices(torch.arange(rows).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def slide(self) -> None:
        """Drop each row's oldest token where the layer holds more than ``W - 1`` (after a decode
        step attended): which rows is a host decision (length mirror), the move is ``drop_one``."""
        store, over = self.store, self.store.length_h > self.sliding_window - 1
        if not over.any():
            return
        if self._oldest is None or self._oldest.shape[0] != store.num_segments or self._oldest.device != store.device:
            self._oldest = torch.zeros(store.num_segments, dtype=torch.long, device=store.device)
        store.drop_one(self._oldest, over)

    def trim_to_window(self) -> None:
        """Keep only the tokens a future query can see, ``pos > seen - W`` (after several tokens
        were appended at once; reads the device once, like any multi-token eviction)."""
        idx, valid = self.store.padded_index()
        keep = valid & (self.store.pos[idx] > self.seen - self.sliding_window)
        if not bool(keep.eq(valid).all()):
            self.store.compact(keep)


class RaggedCache(PromptPieces, Cache):
    """A KV cache with one length per (batch row, layer, KV head), driven by a ``Policy``.

    Use it with a model whose attention is ``"heterocache"``::

        import heterocache
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="heterocache")
        out = model.generate(**inputs, cache=SnapKVCache(budget=0.25))  # past_key_values= before transformers 5.24

    Args:
        policy: what to keep (default: ``FullKVPolicy``, keeps everything).
        block_size: slot alignment of each head's segment in the packed buffers (default 64).
        reserve: free slots reserved per head for decoded tokens when (re)allocating (default 128).
        prefill: how a prompt that arrives in pieces (``generate(prefill_chunk_size=N)``) is
            compressed: "exact" (default) once, when it ends, exactly as in one piece; "bounded" as
            its pieces arrive, keeping after each piece the budget of the prompt seen so far (bounded
            memory, another selection; only policies with ``bounded_prefill``). See
            ``docs/prefill.md``.

    The prompt: every multi-token call until the first single-token step (the first decode step)
    is the prompt, compressed when it ends (at that step, or at :meth:`end_prompt`: call it after
    prefilling a context with forward calls, before a question that is a new turn or before
    reading the compressed cache). ``ingest_prefill`` hands over a whole prompt at once.

    Multi-turn: pass the same cache to a second ``generate()`` with the whole conversation; only the
    new tokens are processed and appended (not compressed). Beam search, ``crop`` and batch
    repeat/select are supported: they permute, repeat or truncate the stored heads.

    Sliding-window layers keep exactly their window and are not compressed; the policy compresses
    the full-attention layers only, and a budget is a fraction of *their* prompt KV (module
    docstring). Architectures the engine cannot serve exactly are refused when the cache first
    meets the model (``heterocache.engine.architectures.UnsupportedArchitectureError``).
    """

    def __init__(self, policy: Policy | None = None, block_size: int = 64, reserve: int = 128,
                 prefill: str = "exact"):
        super().__init__(layers=[])
        self.policy = policy if policy is not None else FullKVPolicy()
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a heterocache Policy, got {type(self.policy).__name__}")
        self.block_size, self.reserve = block_size, reserve
        self.prefill = prefill
        self._pending: _attention.PendingUpdate | None = None
        self.is_croppable_policy = self.policy.croppable
        self.planner = DecodePlanner()
        # The device half of a layer's decode step; replaceable by a compiled version of itself.
        self.decode_step = decode_step
        self.architecture: ArchitectureSpec | None = None  # from the config of the model met
        self._architecture_of = None
        #: The global KV heads this process holds (tensor parallel); found at the first prefill
        #: (``heterocache.engine.parallel.kv_head_shard``) unless set before.
        self.kv_shard: KVShard | None = None

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
        """Drop the last tokens (``tokens_to_remove < 0``). An open prompt ends first (it is
        compressed, then cut, as a prompt prefilled in one forward call always was)."""
        if not self.is_croppable_policy:
            raise NotImplementedError(
                f"{self.policy.name} evicts tokens while decoding, so crop cannot restore the cache; "
                "assisted/speculative decoding is not supported with this method"
            )
        self.end_prompt()
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
        config = getattr(module, "config", None)
        self._configure(layer, config)
        check_attention_call(module, key, value, kwargs, self.architecture)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        q_len = query.shape[2]
        positions = torch.arange(layer.seen - q_len, layer.seen, device=key.device)
        if layer.store is None or layer.prompt is not None:
            if q_len > 1 or layer.prompt is None:  # a piece of the prompt (the first one opens it)
                out = self._prompt_piece(layer, module, query, key, value, attention_mask, scaling, dropout,
                                         positions, config, kwargs)
                if q_len == 1:  # a one-token prompt: it ends here
                    self._end_layer_prompt(layer)
                return out, None
            # The first single-token step ends the prompt, in every layer before any attends.
            self.end_prompt()
        window, idx = layer.sliding_window, layer.policy_idx
        if window is None:
            if q_len > 1:
                self.policy.before_extend(idx, layer.store, query, scaling)
            self.policy.before_attention(idx)
        if q_len == 1:
            # Host half (growth, mirror, plan: once per step and layout), then the device half.
            layer.store.begin_decode_append()
            if window is None and self.policy.selects_per_step:
                # A per-step selection (Quest, ...): append, let the policy choose the slots from
                # the store with the new token in it, attend over those alone (planned only when
                # the layer attends to everything).
                layer.store.append_decode(key, value, positions)
                selection = self.policy.decode_selection(idx, layer.store, query, scaling)
                if selection is None:
                    plan = self.planner.plan(layer.store, layer.seen)
                    out = decode_attention(layer.store, query, scaling, plan=plan)
                else:
                    out = selected_decode_attention(layer.store, query, scaling, selection,
                                                    self.planner.backend(layer.store.device, layer.seen))
            else:
                plan = self.planner.plan(layer.store, layer.seen)
                out = self.decode_step(layer.store, key, value, positions, query, scaling, plan)
            if window is None:
                self.policy.on_decode(idx, layer.store, query, scaling)
            else:
                layer.slide()
            return out, None
        new_valid = None if attention_mask is None else key_validity(attention_mask[..., -q_len:], key)
        if window is not None and new_valid is not None and not bool(new_valid.all()):
            raise NotImplementedError(
                f"padding among the new tokens of a later turn on sliding-window layer {layer.layer_idx} is not "
                "supported (only left padding of the first prompt)"
            )
        extra = None if window is not None else self.policy.extend_extra(idx, layer.store, query, scaling, new_valid)
        out = extend_attention(layer.store, query, key, value, new_valid, scaling, window=window, positions=positions,
                               extra=extra)
        layer.store.append(key, value, positions, new_valid)
        if window is None:
            self.policy.on_extend(idx, layer.store, query, scaling)
        else:
            layer.trim_to_window()
        return out, None

    def _configure(self, layer: RaggedLayer, config) -> None:
        """Read the model's architecture (once per config met; refuses unsupported ones) and give
        the layer its window and policy index (once)."""
        if config is not None and config is not self._architecture_of:
            self.architecture = check_architecture(config)
            self._architecture_of = config
        if layer.configured:
            return
        if self.architecture is not None:
            layer.sliding_window = self.architecture.window(layer.layer_idx)
            layer.policy_idx = self.architecture.policy_index(layer.layer_idx)
        layer.configured = True

    def ingest_prefill(self, layer_idx: int, query, key, value, valid, scaling: float, config=None,
                       position_ids=None, module=None) -> None:
        """Fill an empty layer from a prefill attended elsewhere (what ``attend`` does at prefill,
        without computing the attention output): lets one forward pass fill several caches.

        Args:
            layer_idx: the layer; it must hold no tokens yet.
            query: ``[B, Hq, L, D]``; key, value: ``[B, H, L, D]`` the whole prompt (after RoPE).
            valid: bool ``[B, L]`` real tokens, or None (no padding).
            scaling: the layer's softmax scale.
            config: the model's config (policies read the layer count from it).
            position_ids: the RoPE positions the model used, int ``[B or 1, L]`` (default ``0 .. L-1``;
                methods that undo RoPE read them).
            module: the attention module, when at hand (under tensor parallelism its key projection
                says which KV heads this process holds).

        Raises:
            ValueError: the layer already holds tokens.
        """
        while len(self.layers) <= layer_idx:
            self.layers.append(RaggedLayer(len(self.layers), self.block_size, self.reserve))
        layer = self.layers[layer_idx]
        if layer.seen:
            raise ValueError(f"layer {layer_idx} already holds {layer.seen} tokens; ingest_prefill fills an empty one")
        self._configure(layer, config)
        layer.update(key, value)
        positions = torch.arange(key.shape[-2], device=key.device)
        self._fill(layer, query, key, value, valid, positions, scaling, config, position_ids, module)

    def _resolve_shard(self, key, config=None, module=None) -> KVShard:
        """The global KV heads this process holds: found once (at the first layer filled) from
        the attention module's key projection, the config and ``torch.distributed``
        (``heterocache.engine.parallel.kv_head_shard``), or set by the user before; given to the policy.

        Raises:
            TensorParallelError: the shard cannot be told, or a layer holds another number of heads.
        """
        local = key.shape[1]
        if self.kv_shard is None:
            self.kv_shard = kv_head_shard(module, config=config, local_heads=local)
        elif self.kv_shard.num_local != local:
            raise TensorParallelError(
                f"layer keys hold {local} KV heads, but this cache's shard holds {self.kv_shard.num_local} "
                f"(heads {self.kv_shard.start}..{self.kv_shard.stop - 1} of {self.kv_shard.num_heads})"
            )
        if self.policy.kv_shard is not self.kv_shard:
            self.policy.bind_kv_shard(self.kv_shard)
        return self.kv_shard

    def _fill(self, layer: RaggedLayer, query, key, value, valid, positions, scaling, config=None,
              position_ids=None, module=None) -> None:
        """Compress a whole prompt at once (``ingest_prefill``)."""
        B, H, L, D = key.shape
        self._resolve_shard(key, config, module)
        if valid is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=key.device)
        if layer.sliding_window is not None:
            self._fill_window(layer, key, value, valid, positions, L)
            return
        self.policy.observe_prompt_piece(layer.policy_idx, query, key, valid, scaling)
        queries = last_queries(None, query, self.policy.prompt_queries)
        self._compress(layer, self._context(layer, queries, key, value, valid, scaling, config, position_ids),
                       positions)

    def _context(self, layer: RaggedLayer, query, key, value, valid, scaling, config, position_ids=None,
                 **extra) -> PrefillContext:
        if self.architecture is not None:
            num_layers = len(self.architecture.compressible_layers)
        else:
            num_layers = getattr(config, "num_hidden_layers", None)
        return PrefillContext(layer.policy_idx, query, key, value, valid, scaling, num_layers, config,
                              model_layer=layer.layer_idx, position_ids=position_ids, **extra)

    def _compress(self, layer: RaggedLayer, ctx: PrefillContext, positions, done: bool = True) -> None:
        """Plan, select and store the kept tokens of ``ctx`` (a whole prompt, or in a bounded
        prefill the kept tokens and a new piece); ``done``: the prompt ended (``on_prefill_done``)."""
        B, H, L, D = ctx.key.shape
        valid = ctx.key_valid
        valid = valid[:, None, :] if valid.dim() == 2 else valid
        plan = self.policy.plan(ctx)
        if ctx.head_valid is not None:  # never more than a head holds (a budget growing faster than the prompt)
            plan = torch.minimum(plan, valid.sum(-1).to(plan.device))
        keep = self.policy.select(ctx, plan)
        kept = keep.sum(-1)
        if keep.shape != (B, H, L) or not torch.equal(kept, plan.to(kept.device)):
            raise RuntimeError(
                f"policy {self.policy.name} selected {kept.tolist()} tokens for layer {layer.layer_idx}, "
                f"its plan says {plan.tolist()}"
            )
        if bool((keep & ~valid).any()):
            raise RuntimeError(f"policy {self.policy.name} kept padding tokens in layer {layer.layer_idx}")
        store = RaggedKVStore(B, H, D, ctx.key.dtype, ctx.key.device, self.block_size, self.reserve)
        store.fill(ctx.key, ctx.value, keep, positions)
        layer.store = store
        if done:
            self.policy.on_prefill_done(layer.policy_idx, store, ctx)

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
    def memory_report(self, aggregate: bool = False) -> MemoryReport:
        """Bytes held on the accelerator and in host memory, per layer and per head role, next to
        what a DynamicCache would hold for the same tokens. A layer whose prompt is still open (not
        ended by a decode step or ``end_prompt``) counts it uncompressed, role "open prompt".

        Args:
            aggregate: under tensor parallelism, the whole model's report: every rank's layers
                merged (bytes summed, heads in global order). A collective: every rank must call
                it. Without sharding the same as False.
        """
        return build_memory_report(self, aggregate=aggregate)

    def counters(self, aggregate: bool = False) -> dict:
        """The method's counters (refreshes, drift checks, bytes moved, ...) as plain values, cheap
        enough to read at every step; empty for methods that keep none (HeteroCache's cache
        overrides this).

        Args:
            aggregate: under tensor parallelism, the whole model's numbers (a collective).
        """
        return {}

    def stats(self, aggregate: bool = False) -> dict:
        """:meth:`counters`, with whatever else a method reports about itself (HeteroCache: its
        bytes by role)."""
        return self.counters(aggregate)

    @property
    def kv_heads(self) -> range | None:
        """Global indices of the KV heads this process stores (None before the first prefill)."""
        return None if self.kv_shard is None else self.kv_shard.heads

    def stored_tokens(self) -> list[torch.Tensor]:
        """Stored tokens per layer: int64 ``[B, H]`` each (``H``: this process's heads,
        ``kv_heads``); layers whose prompt is open and not compressed yet are left out."""
        return [layer.store.lengths().clone() for layer in self.layers if layer.store is not None]

    def sliding_windows(self) -> list[int | None]:
        """The window of every layer met so far (None: full attention, compressible)."""
        return [layer.sliding_window for layer in self.layers]


class PolicyCache(RaggedCache):
    """The base of the cache classes ``register_method`` makes, one per policy class
    (``heterocache.engine.registry.policy_cache_class``: ``SnapKVCache(budget=0.25, **options)``,
    ...); ``policy_class`` is the policy it builds."""

    policy_class: type = FullKVPolicy

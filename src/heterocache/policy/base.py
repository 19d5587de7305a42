"""The policy interface: which prompt tokens each (layer, KV head) keeps, and what happens at
each decode step. A policy decides; the store holds; the attention reads.

``FullKVPolicy`` is the interface's defaults under a name (keep everything): what a ``RaggedCache``
uses when given no policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.ragged import RaggedKVStore


@dataclass
class PrefillContext:
    """What a policy sees when a layer's prompt has been attended (``docs/prefill.md``): the whole
    prompt, however many forward calls it came in.

    Attributes:
        layer_idx: index of the layer among those the policy compresses (the model's full-attention
            layers, numbered from 0; the model's layer index when every layer is full).
        num_layers: layers the policy compresses (the model's full-attention layers; sliding-window
            layers are not counted, their KV is outside the budget); may be None when unknown.
        query: ``[B, Hq, Lq, D]`` the last ``Lq`` queries of the prompt (after RoPE): the
            ``Policy.prompt_queries`` last ones (all ``L`` when it is None), fewer for a shorter
            prompt; query ``i`` is the one of token ``L - Lq + i``.
        key, value: ``[B, H, L, D]`` keys (after RoPE) and values.
        valid: bool ``[B, L]``: real tokens (False for left padding).
        scaling: the layer's softmax scale.
        config: the model's config (transformers ``PretrainedConfig``) when known.
        model_layer: the layer's index in the model (default: ``layer_idx``).
        position_ids: the RoPE positions the model rotated the prompt with, int ``[B or 1, L]``
            (the attention call's ``position_ids``: with ``generate()`` and left padding, each row's
            real tokens count from 0); None when the call gave none (then ``0 .. L-1``).
        head_valid: bool ``[B, H, L]`` when each KV head holds its own tokens (a bounded prefill
            re-selecting among what it kept and a new piece, ``docs/prefill.md``): column ``j`` of
            head ``h`` is real; every head's real tokens end at column ``L - 1``. None (default):
            ``valid`` for every head.
        prompt_lengths: int64 ``[B]`` real prompt tokens per row when ``key`` holds fewer (bounded
            prefill); None (default): ``valid.sum(-1)``.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    valid: torch.Tensor
    scaling: float
    num_layers: int | None = None
    config: object | None = None
    model_layer: int | None = None
    position_ids: torch.Tensor | None = None
    head_valid: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None

    def __post_init__(self):
        if self.model_layer is None:
            self.model_layer = self.layer_idx

    def rope_positions(self) -> torch.Tensor:
        """RoPE position of every prompt token, int64 ``[B, L]`` on the keys' device.

        Raises:
            NotImplementedError: multi-axis positions (``[3, B, L]``, M-RoPE).
        """
        B, L = self.key.shape[0], self.key.shape[2]
        if self.position_ids is None:
            return torch.arange(L, device=self.key.device).expand(B, L)
        pos = torch.as_tensor(self.position_ids, device=self.key.device).long()
        if pos.dim() != 2 or pos.shape[-1] != L:
            raise NotImplementedError(f"position_ids of shape {tuple(pos.shape)} for {L} tokens (expected [B, L])")
        return pos.expand(B, L)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.query.shape[1] // self.key.shape[1]

    @property
    def prompt_tokens(self) -> torch.Tensor:
        """Real prompt tokens per row, int64 ``[B]``."""
        return self.valid.sum(-1) if self.prompt_lengths is None else self.prompt_lengths

    @property
    def key_valid(self) -> torch.Tensor:
        """Which keys are real: ``valid`` (bool ``[B, L]``, every head alike) or ``head_valid``
        (``[B, H, L]``) when set. The scoring functions (``heterocache.policy.scoring``) and
        ``topk_keep`` take either."""
        return self.valid if self.head_valid is None else self.head_valid


class Policy:
    """Base class of every KV policy (FullKV, SnapKV, ..., HeteroCache).

    Subclasses override ``plan`` and ``select`` to compress the prompt, and ``on_decode`` to evict or
    refresh while decoding. The defaults keep everything.
    """

    #: The registry name (set by ``heterocache.register_method``).
    name = "base"
    #: The cache class ``register_method`` made for this policy (None for an unregistered policy).
    cache_class = None
    #: Whether ``crop`` can restore the cache exactly (False for methods that evict while decoding).
    croppable = True
    #: How many of the prompt's last queries ``plan``/``select``/``on_prefill_done`` read
    #: (``PrefillContext.query``); None = all of them. A prompt prefilled in pieces keeps only these
    #: between pieces (``docs/prefill.md``), so a policy declares what it reads: 0 for none.
    prompt_queries = None
    #: Whether the policy can compress a prompt as its pieces arrive (``RaggedCache(prefill=
    #: "bounded")``): its ``plan``/``select`` read ``PrefillContext.prompt_tokens`` and
    #: ``key_valid`` (per-head validity), not ``valid``, and its ``on_prefill_done`` needs neither
    #: the whole prompt's queries nor (unless ``bounded_prompt_copy``) its keys and values.
    bounded_prefill = False
    #: With ``bounded_prefill``: whether ``on_prefill_done`` reads the whole prompt's keys and values
    #: (e.g. to keep host copies); the cache then keeps a copy of every piece in host memory while
    #: the prompt is open and hands it over at the end.
    bounded_prompt_copy = False
    #: The KV heads this process holds (``heterocache.engine.parallel.KVShard``), given by the cache
    #: before the first prefill; None until then (one process: every head).
    kv_shard = None

    def bind_kv_shard(self, shard) -> None:
        """Called by the cache with the ``KVShard`` of the model it serves, before the first
        ``plan``. A policy whose decisions span several heads of a layer or the whole model
        (layer budgets, clusters) reduces over the shards with it so that every rank decides
        what one process would."""
        self.kv_shard = shard

    @property
    def is_compileable(self):
        # transformers reads this first from whatever it got as the cache: say what went wrong.
        raise TypeError(
            f"a {type(self).__name__} is a policy, not a cache: pass RaggedCache({type(self).__name__}(...)) "
            "(or the method's cache class, e.g. SnapKVCache) to generate()"
        )

    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        """Role name of each KV head of a layer, for memory accounting."""
        return ["full"] * num_heads

    def observe_prompt_piece(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor,
                             scaling: float) -> None:
        """Called for every piece of a layer's prompt as it is attended, before ``plan`` (a prompt
        in one forward call is one piece): for scores that need every prompt query, which the
        context keeps only the last ``prompt_queries`` of (H2O's accumulated attention). Default:
        nothing.

        Args:
            query: ``[B, Hq, q, D]`` the piece's queries: tokens ``n - q .. n - 1``.
            key: ``[B, H, n, D]`` every key of the prompt so far, the piece's included.
            valid: bool ``[B, n]`` real tokens so far.
        """

    def plan(self, ctx: PrefillContext) -> torch.Tensor:
        """Prompt tokens each (row, KV head) keeps: int64 ``[B, H]``."""
        B, H = ctx.key.shape[:2]
        return ctx.prompt_tokens[:, None].expand(B, H).clone()

    def select(self, ctx: PrefillContext, plan: torch.Tensor) -> torch.Tensor:
        """Which prompt tokens stay: bool ``[B, H, L]`` with exactly ``plan[b, h]`` True per row and
        head, all of them real tokens."""
        B, H = ctx.key.shape[:2]
        valid = ctx.key_valid
        return (valid[:, None, :] if valid.dim() == 2 else valid).expand(B, H, -1).clone()

    def on_prefill_done(self, layer_idx: int, store: RaggedKVStore, ctx: PrefillContext) -> None:
        """Called after the store of a layer was filled (e.g. to offload copies)."""

    def before_attention(self, layer_idx: int) -> None:
        """Called before a decode or extend step reads the layer's store (wait for pending copies)."""

    #: Whether ``decode_selection`` chooses, at each decode step, the slots attention reads.
    selects_per_step = False

    def decode_selection(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float):
        """The slots each segment attends to at this decode step (the new token already stored):
        a ``heterocache.attention.decode.SlotSelection``, or None for all of them. Called only
        when ``selects_per_step``; must not read device values on the host."""
        return None

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        """Called after each decode step's token was appended and attended (evict, refresh)."""

    def before_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        """Called before several new tokens (a later turn) are attended: the store holds the earlier
        tokens only; ``query`` as in :meth:`on_extend`. Runs before :meth:`before_attention`."""

    def extend_extra(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float,
                     valid: torch.Tensor | None = None):
        """Tokens kept outside the store that a later turn's new tokens attend to besides the stored
        ones, all in their past (e.g. ShadowKV's rebuilt chunks): ``(key [S, M, D], value [S, M, D],
        valid bool [S, M])``, or None (default: the store alone). Called after
        :meth:`before_attention`, before the turn is attended.

        Args:
            query: ``[B, Hq, q, D]`` the new tokens' queries.
            valid: bool ``[B, q]``: which new tokens are real (None: all).
        """
        return None

    def on_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        """Called after several new tokens (a later turn of a conversation) were attended and appended.

        Args:
            query: ``[B, Hq, q, D]`` the new tokens' queries (left padding, if any, is at the start).
        """

    def select_rows(self, rows: torch.Tensor) -> None:
        """Reorder or repeat per-row policy state (beam search, batch expansion)."""

    def reset(self) -> None:
        """Forget all per-prompt state."""

    # -- what the engine, the memory report and the harness ask every policy (defaults: nothing)
    def check_prompt(self, prompt_tokens: int) -> None:
        """Raise ``ValueError`` if this policy cannot serve a prompt of ``prompt_tokens`` tokens at
        its budget (HeteroCache: a budget below the heads it keeps whole). The evaluation harness
        asks before a grid starts, so an infeasible cell is skipped up front, not mid-run."""

    def host_bytes_per_layer(self) -> dict[int, int]:
        """Bytes this policy holds in host memory per layer (its index among the compressed layers);
        empty when it keeps nothing off the device."""
        return {}

    def device_extra_bytes_per_layer(self) -> dict[int, int]:
        """Bytes this policy holds on the device per layer besides the store (landmarks, low-rank
        factors, page summaries, ...); empty when none."""
        return {}

    def synchronize(self) -> None:
        """Wait for this policy's asynchronous host-device copies (before reading its counters)."""

    def copy_seconds(self) -> float:
        """Seconds spent in host-device copies so far (measured on the GPU; 0.0 when none)."""
        return 0.0


@dataclass
class FullKVPolicy(Policy):
    """Keeps the whole prompt and every decoded token. Gives exactly DynamicCache's tokens.

    The default policy of ``RaggedCache`` (the engine's uncompressed reference); method "fullkv"
    (:mod:`heterocache.methods.fullkv`) is this policy by name.
    """

    name = "fullkv"
    prompt_queries = 0
    bounded_prefill = True

"""Which model architectures the ragged engine serves exactly, read from a transformers config.

The engine implements causal softmax attention over per-head KV with two layer kinds:

- ``"full_attention"``: every past token is visible; these layers are what the methods compress;
- ``"sliding_attention"``: a query at position ``p`` sees positions ``p - W + 1 .. p`` (``W`` =
  ``config.sliding_window``, transformers' ``sliding_window_overlay``); these layers keep exactly
  that window (between steps the ``W - 1`` newest tokens, like transformers'
  ``DynamicSlidingWindowLayer``) and are never compressed.

Everything else is refused with :class:`UnsupportedArchitectureError` before a token is stored:
layer types we do not implement (chunked, linear attention, state-space, ...), multi-head latent
attention, attention sinks, softcapped attention logits, ALiBi, KV sharing between layers,
bidirectional or encoder-decoder attention. :func:`check_architecture` needs only the config, so
it runs as early as possible: in ``heterocache.enable(model)``, in ``make_cache(..., model)``,
when the ``heterocache`` attention builds a model's masks (the first forward of a model loaded
with ``attn_implementation="heterocache"``) and when a ragged cache first meets a layer.
:func:`check_attention_call` is the per-call safety net for what only the attention call shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

#: The layer types of ``config.layer_types`` the engine implements.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

#: Model types whose attention adds learned sinks (``s_aux``) to the softmax: nothing in their
#: config says so, and the ragged attention does not implement them.
SINK_MODEL_TYPES = frozenset({
    "gpt_oss", "granite_swa", "granitemoe_swa", "mimo_v2_flash", "flint", "hy_v4", "hy_v4_vl",
    "deepseek_v4", "openai_privacy_filter",
})

#: Config fields that only state-space or linear-attention (recurrent) models have.
RECURRENT_FIELDS = (
    "ssm_state_size", "mamba_d_state", "time_step_rank", "layers_block_type", "hybrid_override_pattern",
    "attn_layer_indices", "attn_layer_period", "linear_num_value_heads", "linear_key_head_dim",
    "full_attn_idxs", "block_types",
)


class UnsupportedArchitectureError(NotImplementedError, ValueError):
    """A model or config whose attention the ragged engine cannot serve exactly (the message
    names the architecture and the reason). Both a ``NotImplementedError`` and a ``ValueError``."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """The attention layout of a supported model, as the engine uses it.

    Attributes:
        name: the architecture (``config.architectures[0]``, else the model type).
        layer_types: per layer, "full_attention" or "sliding_attention".
        sliding_windows: per layer, the window ``W`` of a sliding layer (None for full layers).
    """

    name: str
    layer_types: tuple[str, ...]
    sliding_windows: tuple[int | None, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def compressible_layers(self) -> tuple[int, ...]:
        """The full-attention layers (model indices): the only ones a method compresses, and the
        ones a budget is counted over."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer (None: full attention, or a layer beyond the config)."""
        return self.sliding_windows[layer_idx] if layer_idx < self.num_layers else None

    @cached_property
    def _policy_indices(self) -> dict[int, int]:
        return {layer: i for i, layer in enumerate(self.compressible_layers)}

    def policy_index(self, layer_idx: int) -> int | None:
        """A full layer's index among the compressible layers (what a policy calls the layer:
        policies see the compressible layers only, numbered from 0); None for a sliding layer."""
        if layer_idx >= self.num_layers:  # beyond the config: counted as full, after the others
            return layer_idx - self.num_layers + len(self.compressible_layers)
        return self._policy_indices.get(layer_idx)


def architecture_name(config) -> str:
    """``config.architectures[0]`` (e.g. "Gemma2ForCausalLM"), else the config class and model type."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    name = type(config).__name__.removesuffix("Config")
    model_type = getattr(config, "model_type", None)
    return f"{name} (model_type {model_type!r})" if model_type else name


def _refuse(config, reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{architecture_name(config)} is not supported by the heterocache engine: {reason}. "
        "It serves causal softmax attention with full and sliding-window layers (see docs/models.md); "
        "use the model's own attention (e.g. attn_implementation='sdpa') and a transformers cache instead."
    )


def _get(config, name):
    return getattr(config, name, None)


def layer_types_of(config) -> list[str]:
    """Per-layer attention types as transformers derives them (``get_layer_types_and_kwargs``):
    ``config.layer_types``, else every layer "sliding_attention" when ``sliding_window`` is set
    (Mistral, Phi-3), "chunked_attention" when ``attention_chunk_size`` is, "full_attention"
    otherwise."""
    types = _get(config, "layer_types")
    if types is not None:
        return list(types)
    n = int(_get(config, "num_hidden_layers") or 0)
    if _get(config, "sliding_window") is not None:
        return ["sliding_attention"] * n
    if _get(config, "attention_chunk_size") is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def check_architecture(config) -> ArchitectureSpec:
    """The attention layout of ``config`` if the engine serves it exactly.

    Args:
        config: a transformers ``PretrainedConfig`` (a composite one is read through its text
            config) or a model (its ``config``).

    Returns:
        the model's ``ArchitectureSpec``.

    Raises:
        UnsupportedArchitectureError: naming the architecture and the reason.
    """
    config = getattr(config, "config", config)  # a model
    if _get(config, "is_encoder_decoder"):
        raise _refuse(config, "encoder-decoder models (cross-attention) are not implemented")
    top = config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    model_type = _get(config, "model_type") or _get(top, "model_type")
    if _get(config, "is_causal") is False or _get(config, "use_bidirectional_attention"):
        raise _refuse(top, "bidirectional (non-causal) attention is not implemented")
    if _get(config, "kv_lora_rank") is not None:
        raise _refuse(top, f"multi-head latent attention (kv_lora_rank={config.kv_lora_rank}) is not implemented")
    recurrent = [f for f in RECURRENT_FIELDS if _get(config, f) is not None]
    if recurrent:
        raise _refuse(top, f"state-space / linear-attention layers ({', '.join(recurrent)}) are not implemented")
    if model_type in SINK_MODEL_TYPES or _get(top, "model_type") in SINK_MODEL_TYPES:
        raise _refuse(top, "attention sinks (learned logits added to the softmax) are not implemented")
    if _get(config, "attn_logit_softcapping") is not None:
        raise _refuse(top, f"softcapped attention logits (attn_logit_softcapping={config.attn_logit_softcapping}) "
                           "are not implemented")
    if _get(config, "alibi"):
        raise _refuse(top, "ALiBi position biases are not implemented")
    if _get(config, "num_kv_shared_layers") or _get(config, "kv_sharing_modes") is not None:
        raise _refuse(top, "layers that share another layer's KV cache are not implemented")
    types = layer_types_of(config)
    n = _get(config, "num_hidden_layers")
    if n is not None and len(types) != int(n):
        raise _refuse(top, f"config.layer_types has {len(types)} entries for {n} layers")
    unknown = sorted({t for t in types if t not in SUPPORTED_LAYER_TYPES})
    if unknown:
        where = {t: [i for i, u in enumerate(types) if u == t] for t in unknown}
        listed = "; ".join(f"{t!r} (layers {_span(idx)})" for t, idx in where.items())
        raise _refuse(top, f"layer types {listed} are not implemented (only {', '.join(SUPPORTED_LAYER_TYPES)})")
    window = _get(config, "sliding_window")
    if "sliding_attention" in types and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
        raise _refuse(top, f"sliding-window layers need an integer sliding_window >= 2, got {window!r}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return ArchitectureSpec(architecture_name(top), tuple(types), windows)


def _span(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if len(indices) <= 6 else f"{indices[0]}..{indices[-1]}, {len(indices)} in all"


def check_attention_call(module, key, value, kwargs: dict, spec: ArchitectureSpec | None = None) -> None:
    """Refuse an attention call that asks for what the ragged attention does not compute.

    Host-side checks of the call's keyword arguments (no tensor is read): softcapping
    (``softcap``), attention sinks (``s_aux``), a position bias, non-causal attention, keys and
    values of different head sizes, and a ``sliding_window`` other than the config's for the layer.

    Raises:
        UnsupportedArchitectureError
    """
    config = getattr(module, "config", None)
    name = architecture_name(config) if config is not None else type(module).__name__
    reason = None
    if kwargs.get("softcap") is not None:
        reason = f"softcapped attention logits (softcap={kwargs['softcap']})"
    elif kwargs.get("s_aux") is not None:
        reason = "attention sinks (s_aux)"
    elif kwargs.get("position_bias") is not None:
        reason = "an additive position bias"
    elif kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        reason = "non-causal attention"
    elif key.shape[-1] != value.shape[-1]:
        reason = f"keys and values of different head sizes ({key.shape[-1]} and {value.shape[-1]})"
    elif spec is not None:
        layer = getattr(module, "layer_idx", None)
        passed = kwargs.get("sliding_window")
        expected = spec.window(layer) if layer is not None else None
        if passed is not None and passed != expected:
            kind = spec.layer_types[layer] if layer is not None and layer < spec.num_layers else "unknown"
            reason = (f"layer {layer} attends with sliding_window={passed}, but its config makes it "
                      f"{kind} (window {expected})")
    if reason is not None:
        raise UnsupportedArchitectureError(
            f"{name} is not supported by the heterocache engine: its attention asks for {reason}, "
            "which the ragged attention does not compute (see docs/models.md)"
        )

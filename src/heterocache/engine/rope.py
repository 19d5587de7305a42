"""Rotary position embedding (RoPE) of a model, from its config: apply it, and undo it.

The attention function receives keys *after* RoPE. A method that works on pre-RoPE keys
(ShadowKV's low-rank factors) undoes the rotation at the positions the model used, and later
rotates rebuilt keys again at their positions. :class:`Rotary` computes ``cos``/``sin`` exactly as
transformers' rotary embedding modules do (``inv_freq`` from the config's ``rope_parameters`` via
``ROPE_INIT_FUNCTIONS``, ``cos(pos * inv_freq) * attention_scaling`` in float32, cast to the model's
dtype), so the inverse is the inverse of the very rotation the model applied: on each pair of
channels ``(i, i + R/2)`` RoPE is the 2x2 map ``[[c, -s], [s, c]]`` (``rotate_half``), whose inverse
is ``[[c, s], [-s, c]] / (c^2 + s^2)``; dividing by ``c^2 + s^2`` makes it exact for every RoPE type
whose ``attention_scaling`` multiplies ``cos`` and ``sin`` (YaRN, LongRoPE) and for the rounding of
``cos``/``sin`` to a half-precision dtype. Channels past the rotary dimension (``partial_rotary_factor``,
Phi-3 style) pass unchanged.

Supported ``rope_type``: "default", "linear", "llama3", "yarn", "proportional" (frequencies fixed by
the config), and "longrope" (its short or long factors chosen, as the model's forward chooses them,
by the longest position of the prompt). "dynamic" NTK scaling recomputes the frequencies from the
history of sequence lengths a model instance has seen and is refused.
"""

from __future__ import annotations

import torch

__all__ = ["Rotary", "rotate_half"]

#: RoPE types whose frequencies depend on the sequence lengths a model instance has seen so far.
UNSUPPORTED_ROPE_TYPES = ("dynamic",)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension (transformers' convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_parameters(config, layer_type: str | None) -> tuple[dict, str | None]:
    """The config's RoPE parameters for a layer type, and the layer type to pass to transformers'
    init functions (None when the parameters are not given per layer type)."""
    params = getattr(config, "rope_parameters", None)
    if params is None and hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
        params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        raise ValueError(f"{type(config).__name__} has no rope_parameters: the model does not use RoPE")
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type], layer_type
    return params, None


class Rotary:
    """The RoPE of one layer: ``inv_freq`` (float32 ``[R/2]``) and ``attention_scaling``.

    Build it with :meth:`from_config`; ``cos_sin(positions, dtype)`` gives what the model's rotary
    embedding returns for those positions, ``apply``/``invert`` rotate and unrotate.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, rope_type: str = "default"):
        self.inv_freq = inv_freq.detach().to(torch.float32)
        self.attention_scaling = float(attention_scaling)
        self.rope_type = rope_type
        self._on: dict[torch.device, torch.Tensor] = {}

    @property
    def rotary_dim(self) -> int:
        """Channels rotated (the first ``R`` of each head); the rest pass unchanged."""
        return 2 * self.inv_freq.shape[0]

    @classmethod
    def from_config(cls, config, layer_type: str | None = "full_attention", seq_len: int | None = None) -> Rotary:
        """The RoPE a model with this config applies on layers of ``layer_type``.

        Args:
            config: a transformers config (``rope_parameters``, ``head_dim`` or ``hidden_size`` /
                ``num_attention_heads``).
            layer_type: picks the parameters when the config gives them per layer type (Gemma 3);
                ignored otherwise.
            seq_len: the longest position + 1 the model saw when it rotated the keys (LongRoPE picks
                its long factors beyond ``original_max_position_embeddings``); unused by other types.

        Raises:
            ValueError: the config has no RoPE, or an unknown ``rope_type``.
            NotImplementedError: a RoPE type whose frequencies depend on the model's history ("dynamic").
        """
        params, per_type = _rope_parameters(config, layer_type)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in UNSUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope_type {rope_type!r} recomputes its frequencies from the sequence lengths a model has seen; "
                "the pre-RoPE keys cannot be recovered from the config alone"
            )
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
            dim = int(head_dim * partial)
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            return cls(inv_freq, 1.0, rope_type)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope_type {rope_type!r} (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
        kwargs = {} if per_type is None else {"layer_type": per_type}
        if rope_type == "longrope":
            kwargs["seq_len"] = seq_len
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
        return cls(inv_freq, scaling, rope_type)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = self.inv_freq.to(device)
        return t

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[*positions.shape, R]`` as the model's rotary embedding computes them (float32,
        then cast to ``dtype``). Device ops only."""
        freqs = positions[..., None].float() * self._inv_freq(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``R`` channels of ``x [..., D]``: ``x * cos + rotate_half(x) * sin`` (cos/sin
        broadcast against ``x[..., :R]``), in the dtype of the operands."""
        R = self.rotary_dim
        rot = x[..., :R] * cos + rotate_half(x[..., :R]) * sin
        return rot if R == x.shape[-1] else torch.cat((rot, x[..., R:]), dim=-1)

    def invert(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` with the same ``cos``/``sin``: ``(y * cos - rotate_half(y) * sin) / (cos^2 +
        sin^2)`` on the rotated channels. Exact up to the rounding of ``y`` (compute in float32 or
        float64 for a half-precision model)."""
        R = self.rotary_dim
        c, s = cos.to(y.dtype), sin.to(y.dtype)
        rot = (y[..., :R] * c - rotate_half(y[..., :R]) * s) / (c * c + s * s)
        return rot if R == y.shape[-1] else torch.cat((rot, y[..., R:]), dim=-1)

    def __repr__(self) -> str:
        return f"Rotary({self.rope_type}, rotary_dim={self.rotary_dim}, attention_scaling={self.attention_scaling})"

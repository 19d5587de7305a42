"""The attention shape of a model, as far as a head profile cares, and where a profile's differs.

Shared by :func:`heterocache.profile.validation.check_fits` (a loaded profile and a loaded model)
and the command line's checks before any model loads (a profile file's header and the model's
config). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ProfileError


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a decoder model, as far as a head profile cares."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    name: str | None = None


def model_shape(config_or_model: Any) -> ModelShape:
    """Attention shape of a model, a transformers config, or a plain dict of config fields.

    Reads ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (default: the
    query heads) and ``head_dim`` (default: ``hidden_size // num_attention_heads``); for
    multimodal configs the text config is used (``text_config`` of a dict).
    """
    config = getattr(config_or_model, "config", config_or_model)
    if isinstance(config, dict):
        fields = dict(config)
        if "num_hidden_layers" not in fields and isinstance(fields.get("text_config"), dict):
            fields = {**fields["text_config"], "name_or_path": fields.get("name_or_path"),
                      "_name_or_path": fields.get("_name_or_path")}
        name = fields.get("name_or_path") or fields.get("_name_or_path")
    else:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        fields = {key: getattr(config, key, None) for key in (
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")}
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    try:
        layers = int(fields["num_hidden_layers"])
        q_heads = int(fields["num_attention_heads"])
    except (KeyError, TypeError):
        raise ProfileError(
            f"cannot read num_hidden_layers / num_attention_heads from {type(config).__name__}"
        ) from None
    kv_heads = fields.get("num_key_value_heads") or q_heads
    head_dim = fields.get("head_dim") or (int(fields["hidden_size"]) // q_heads if fields.get("hidden_size") else None)
    if head_dim is None:
        raise ProfileError(f"cannot read head_dim or hidden_size from {type(config).__name__}")
    return ModelShape(layers, q_heads, int(kv_heads), int(head_dim), name or None)


def shape_mismatches(profile: Any, model: ModelShape) -> list[str]:
    """``"<field>: profile X != model Y"`` for each shape field where they differ.

    Args:
        profile: anything with ``num_layers``, ``num_attention_heads``, ``num_kv_heads`` and
            ``head_dim`` (a ``HeadProfile``, a profile file's header); a field that is None is
            not compared.
        model: the model's shape.
    """
    pairs = (
        ("layers", profile.num_layers, model.num_layers),
        ("query heads", profile.num_attention_heads, model.num_attention_heads),
        ("KV heads", profile.num_kv_heads, model.num_kv_heads),
        ("head_dim", profile.head_dim, model.head_dim),
    )
    return [f"{what}: profile {ours} != model {theirs}" for what, ours, theirs in pairs
            if ours is not None and ours != theirs]


def misfit_message(profile_name: str | None, model_name: str | None, mismatches: list[str]) -> str:
    """The message of a profile that does not fit a model (one line)."""
    return (f"head profile of '{profile_name}' does not fit model '{model_name or '?'}': "
            + "; ".join(mismatches))

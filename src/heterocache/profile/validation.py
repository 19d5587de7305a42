"""Consistency checks of a head profile, and of a profile against the model it is used with.

Every failure raises :class:`ProfileError` naming the offending (layer, KV head) or field, so a
broken or mismatched profile never reaches the runtime.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .errors import ProfileError
from .roles import ROLE_CODES, Role
from .shape import ModelShape, misfit_message, model_shape, shape_mismatches  # noqa: F401  (ModelShape: re-export)

if TYPE_CHECKING:
    from .head_profile import HeadProfile

_VALID_CODES = torch.tensor([int(r) for r in Role])


def check_structure(profile: "HeadProfile") -> None:
    """Check that the tensors and metadata of ``profile`` describe a valid taxonomy.

    Raises:
        ProfileError: shapes differ, unknown role code, satellite without a valid same-layer
            pivot, pivot without satellites, missing budget ratio of a compressed head,
            stability outside [0, 1], or inconsistent shape metadata.
    """
    check_shapes(profile)
    roles, pivots = profile.roles, profile.pivots

    bad = ~torch.isin(roles, _VALID_CODES)
    if bad.any():
        layer, head = _first(bad)
        raise ProfileError(
            f"unknown role code {int(roles[layer, head])} at layer {layer}, KV head {head} "
            f"(valid codes: {ROLE_CODES})"
        )

    _check_pivots(roles, pivots)
    _check_budget_ratios(profile)
    _check_stability(profile)
    _check_metadata(profile)


def check_shapes(profile: "HeadProfile") -> None:
    """Raise :class:`ProfileError` unless all four tensors share one non-empty 2-D shape."""
    roles = profile.roles
    if roles.dim() != 2 or roles.numel() == 0:
        raise ProfileError(f"roles must be a non-empty [layers, kv_heads] tensor, got shape {tuple(roles.shape)}")
    for name in ("stability", "budget_ratios", "pivots"):
        shape = tuple(getattr(profile, name).shape)
        if shape != tuple(roles.shape):
            raise ProfileError(f"{name} has shape {shape}, expected {tuple(roles.shape)} like roles")


def _first(mask: torch.Tensor) -> tuple[int, int]:
    layer, head = mask.nonzero()[0].tolist()
    return layer, head


def _check_pivots(roles: torch.Tensor, pivots: torch.Tensor) -> None:
    num_heads = roles.shape[1]
    satellite = roles == Role.SATELLITE
    no_pivot = ~satellite & (pivots != -1)
    if no_pivot.any():
        layer, head = _first(no_pivot)
        raise ProfileError(
            f"layer {layer}, KV head {head} is {Role(int(roles[layer, head])).with_article} but has pivot "
            f"{int(pivots[layer, head])}; only satellites have a pivot (use -1)"
        )
    for layer, head in satellite.nonzero().tolist():
        pivot = int(pivots[layer, head])
        where = f"satellite at layer {layer}, KV head {head}"
        if pivot == -1:
            raise ProfileError(f"{where} has no pivot (-1)")
        if not 0 <= pivot < num_heads:
            raise ProfileError(f"{where} points to pivot {pivot}, outside the layer's KV heads [0, {num_heads})")
        if pivot == head:
            raise ProfileError(f"{where} is its own pivot")
        if roles[layer, pivot] != Role.PIVOT:
            raise ProfileError(
                f"{where} points to KV head {pivot} of the same layer, which is "
                f"{Role(int(roles[layer, pivot])).with_article}, not a pivot"
            )
    for layer, head in (roles == Role.PIVOT).nonzero().tolist():
        if not (pivots[layer] == head).any():
            raise ProfileError(f"pivot at layer {layer}, KV head {head} has no satellites")


def _check_budget_ratios(profile: "HeadProfile") -> None:
    compressed = profile.compressed_mask()
    ratios = profile.budget_ratios
    bad = compressed & ~(torch.isfinite(ratios) & (ratios > 0))
    if bad.any():
        layer, head = _first(bad)
        raise ProfileError(
            f"{Role(int(profile.roles[layer, head])).label} at layer {layer}, KV head {head} has budget ratio "
            f"{float(ratios[layer, head])}; compressed heads need a finite ratio > 0"
        )


def _check_stability(profile: "HeadProfile") -> None:
    stability = profile.stability
    if not profile.has_stability:
        return
    bad = ~(torch.isfinite(stability) & (stability >= 0) & (stability <= 1))
    if bad.any():
        layer, head = _first(bad)
        raise ProfileError(
            f"stability at layer {layer}, KV head {head} is {float(stability[layer, head])}; expected a value "
            "in [0, 1] (set has_stability=False for profiles without stability scores)"
        )


def _check_metadata(profile: "HeadProfile") -> None:
    kv = profile.num_kv_heads
    if not isinstance(profile.num_attention_heads, int) or profile.num_attention_heads < kv:
        raise ProfileError(f"num_attention_heads={profile.num_attention_heads!r} must be an int >= {kv} KV heads")
    if profile.num_attention_heads % kv:
        raise ProfileError(
            f"num_attention_heads={profile.num_attention_heads} is not a multiple of the {kv} KV heads"
        )
    if not isinstance(profile.head_dim, int) or profile.head_dim <= 0:
        raise ProfileError(f"head_dim={profile.head_dim!r} must be a positive int")
    if profile.topk is not None and (not isinstance(profile.topk, int) or profile.topk <= 0):
        raise ProfileError(f"topk={profile.topk!r} must be a positive int or None")
    for name in ("tau_stable", "tau_sim"):
        value = getattr(profile, name)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1 and not math.isnan(value)):
            raise ProfileError(f"{name}={value!r} must be in [0, 1] or None")
    if not isinstance(profile.model_name, str):
        raise ProfileError(f"model_name must be a string, got {profile.model_name!r}")


def check_fits(profile: "HeadProfile", config_or_model: Any) -> None:
    """Raise :class:`ProfileError` listing every shape field where ``profile`` and the model differ.

    A different model name with an identical shape (a fine-tune, a local copy) only warns.
    """
    shape = model_shape(config_or_model)
    mismatches = shape_mismatches(profile, shape)
    if mismatches:
        raise ProfileError(misfit_message(profile.model_name, shape.name, mismatches))
    if shape.name and profile.model_name and not _same_model_name(shape.name, profile.model_name):
        warnings.warn(
            f"head profile was made for '{profile.model_name}' but is used with '{shape.name}' "
            "(same attention shape, so it is accepted)",
            stacklevel=3,
        )


def _same_model_name(a: str, b: str) -> bool:
    from ..models import known_model_name

    a, b = known_model_name(a) or a, known_model_name(b) or b

    def short(name: str) -> str:
        return name.rstrip("/").replace("\\", "/").split("/")[-1].lower()

    return short(a) == short(b)

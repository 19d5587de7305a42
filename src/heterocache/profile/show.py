"""Plain-text summary of a profile (``heterocache profile show``)."""

from __future__ import annotations

import math

from .head_profile import HeadProfile
from .roles import Role


def head_code(profile: HeadProfile, layer: int, head: int) -> str:
    """Compact code of one head: ``A`` anchor, ``V`` volatile, ``P`` pivot, ``S<pivot>`` satellite."""
    role = profile.role_of(layer, head)
    return f"S{profile.pivot_of(layer, head)}" if role is Role.SATELLITE else role.letter


def format_profile(profile: HeadProfile, *, stability: bool = False) -> str:
    """Header (model, shape, settings, provenance), counts per role, and a per-layer table.

    Args:
        stability: add each head's stability score to the table.
    """
    lines = [
        f"model        {profile.model_name}" + (f" @ {profile.revision}" if profile.revision else ""),
        f"shape        {profile.num_layers} layers, {profile.num_attention_heads} query heads, "
        f"{profile.num_kv_heads} KV heads, head_dim {profile.head_dim}",
        f"settings     top-k {profile.topk}, tau_stable {profile.tau_stable}, tau_sim {profile.tau_sim}",
        f"stability    {'measured' if profile.has_stability else 'not available (NaN)'}",
        f"source       {_source(profile)}",
        f"library      heterocache {profile.library_version}",
        "",
        "role         heads   share",
    ]
    for label, n in profile.counts().items():
        lines.append(f"{label:<12} {n:>5}  {100 * n / profile.num_heads:5.1f}%")
    lines.append(f"{'total':<12} {profile.num_heads:>5}   (compressed: {int(profile.compressed_mask().sum())})")
    lines += ["", "codes: A anchor, V volatile, P pivot, S<i> satellite of pivot i", ""]
    width = max(3, *(len(head_code(profile, l, h)) for l in range(profile.num_layers)
                     for h in range(profile.num_kv_heads)))
    header = "layer  A  V  P  S   " + " ".join(f"{h:>{width}}" for h in range(profile.num_kv_heads))
    lines.append(header)
    for layer in range(profile.num_layers):
        c = profile.layer_counts(layer)
        codes = " ".join(f"{head_code(profile, layer, h):>{width}}" for h in range(profile.num_kv_heads))
        lines.append(f"{layer:>5} {c['anchor']:>2} {c['volatile']:>2} {c['pivot']:>2} {c['satellite']:>2}   {codes}")
        if stability and profile.has_stability:
            values = " ".join(_fmt(float(profile.stability[layer, h]), width) for h in range(profile.num_kv_heads))
            lines.append(f"{'S':>5} {'':11}   {values}")
    return "\n".join(lines)


def _fmt(value: float, width: int) -> str:
    return f"{'nan':>{width}}" if math.isnan(value) else f"{value:>{width}.2f}"


def _source(profile: HeadProfile) -> str:
    src = profile.source
    if "converted_from" in src:
        return f"converted from {src.get('repository')}/{src['converted_from']} ({src.get('license')})"
    return src.get("made_by") or "unknown"

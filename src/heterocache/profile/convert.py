"""Converter for the head profiles published with the reference implementation.

Source: repository ponytaill/HeteroCache, folder data/clusters, Apache License 2.0
(``Head_Analysis_<model>_topk<k>_th<tau_stable>_sim<tau_sim>_step<prefill>.json``). Each file has
``meta.type_map`` (role name -> code; the Qwen2.5 file uses the older names Stable_Unique,
Decaying_Unique, Similar_Leader, Similar_Member), ``meta.counts``, ``classification_matrix``
``[layer][kv_head]``, ``allocation_matrix`` (budget ratio, -1.0 for full heads) and
``leader_member_relations`` (per layer ``{"pivot": [satellites]}``).

The files hold no stability scores: converted profiles have NaN stability and
``has_stability=False``. Settings (top-k, thresholds, reference step) come from the file name
unless given. Converted role counts are checked against ``meta.counts``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .errors import ProfileError
from .head_profile import HeadProfile
from .roles import Role

UPSTREAM_REPOSITORY = "ponytaill/HeteroCache"
UPSTREAM_FOLDER = "data/clusters"
UPSTREAM_LICENSE = "Apache-2.0"

_SETTINGS = re.compile(r"topk(?P<topk>\d+)_th(?P<th>[0-9.]+?)_sim(?P<sim>[0-9.]+?)_step(?P<step>\d+)")


def parse_upstream_settings(filename: str) -> dict[str, Any]:
    """``{"topk", "tau_stable", "tau_sim", "reference_step"}`` from a published file name
    (empty when the name does not carry them)."""
    match = _SETTINGS.search(Path(filename).name)
    if match is None:
        return {}
    return {
        "topk": int(match["topk"]),
        "tau_stable": float(match["th"]),
        "tau_sim": float(match["sim"]),
        "reference_step": int(match["step"]),
    }


def convert_upstream(
    json_path: str | Path,
    *,
    model_name: str,
    num_attention_heads: int,
    head_dim: int,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    revision: str | None = None,
    topk: int | None = None,
    tau_stable: float | None = None,
    tau_sim: float | None = None,
) -> HeadProfile:
    """Read a published reference profile into a :class:`HeadProfile`.

    Args:
        json_path: the published JSON file.
        model_name: Hub id of the profiled model, e.g. "meta-llama/Llama-3.1-8B-Instruct".
        num_attention_heads, head_dim: shape metadata the JSON lacks.
        num_layers, num_kv_heads: when given, checked against the JSON matrices.
        revision: model revision, if known.
        topk, tau_stable, tau_sim: override the settings read from the file name.

    Raises:
        ProfileError: malformed file, unknown role name or code, shape disagreeing with
            ``num_layers``/``num_kv_heads``, pivots inconsistent with the roles, or role counts
            different from ``meta.counts``.
    """
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta, matrix = data["meta"], data["classification_matrix"]
        allocation, relations = data["allocation_matrix"], data["leader_member_relations"]
        type_map = meta["type_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ProfileError(f"{path}: not a published HeteroCache profile ({type(err).__name__}: {err})") from None

    try:
        code_to_role = {int(code): Role.parse(name) for name, code in type_map.items()}
    except ValueError as err:
        raise ProfileError(f"{path}: {err}") from None
    layers, heads = _matrix_shape(matrix, "classification_matrix", path)
    if _matrix_shape(allocation, "allocation_matrix", path) != (layers, heads):
        raise ProfileError(f"{path}: allocation_matrix shape differs from classification_matrix")
    for what, given, actual in (("layers", num_layers, layers), ("KV heads", num_kv_heads, heads)):
        if given is not None and given != actual:
            raise ProfileError(f"{path}: the JSON matrices have {actual} {what}, but {given} were given")

    roles = torch.empty(layers, heads, dtype=torch.long)
    for layer, row in enumerate(matrix):
        for head, code in enumerate(row):
            if code not in code_to_role:
                raise ProfileError(f"{path}: unknown role code {code} at layer {layer}, KV head {head} "
                                   f"(type_map: {type_map})")
            roles[layer, head] = code_to_role[code]
    pivots = _pivots(relations, layers, heads, path)

    published = {Role.parse(name).label: int(n) for name, n in meta.get("counts", {}).items()}
    settings = parse_upstream_settings(path.name)
    profile = HeadProfile(
        roles=roles,
        stability=torch.full((layers, heads), float("nan")),
        budget_ratios=torch.tensor(allocation, dtype=torch.float32),
        pivots=pivots,
        model_name=model_name,
        num_attention_heads=num_attention_heads,
        head_dim=head_dim,
        revision=revision,
        tau_stable=tau_stable if tau_stable is not None else settings.get("tau_stable"),
        tau_sim=tau_sim if tau_sim is not None else settings.get("tau_sim"),
        topk=topk if topk is not None else settings.get("topk"),
        calibration={
            "description": "reference profiler (paper): ~50 Wikipedia-like texts, prefill 5000 tokens, "
                           "100 greedy decode tokens; similarity at the prefill step",
            "reference_step": settings.get("reference_step"),
        },
        source={
            "converted_from": f"{UPSTREAM_FOLDER}/{path.name}",
            "repository": UPSTREAM_REPOSITORY,
            "url": f"https://github.com/{UPSTREAM_REPOSITORY}",
            "license": UPSTREAM_LICENSE,
            "attribution": "Head taxonomy published by the HeteroCache authors (arXiv:2601.13684) "
                           "with their reference implementation",
            "note": "no stability scores in the published file (stability is NaN)",
        },
        has_stability=False,
        extra={"upstream_counts": published, "upstream_type_map": type_map},
    )
    if published and profile.counts() != {role.label: published.get(role.label, 0) for role in Role}:
        raise ProfileError(f"{path}: converted role counts {profile.counts()} differ from meta.counts {published}")
    return profile


def _matrix_shape(matrix: Any, name: str, path: Path) -> tuple[int, int]:
    if not isinstance(matrix, list) or not matrix or not all(isinstance(r, list) for r in matrix):
        raise ProfileError(f"{path}: {name} must be a non-empty list of rows")
    widths = {len(row) for row in matrix}
    if len(widths) != 1:
        raise ProfileError(f"{path}: {name} rows have different lengths {sorted(widths)}")
    return len(matrix), widths.pop()


def _pivots(relations: Any, layers: int, heads: int, path: Path) -> torch.Tensor:
    if not isinstance(relations, list) or len(relations) != layers:
        raise ProfileError(f"{path}: leader_member_relations must list {layers} layers")
    pivots = torch.full((layers, heads), -1, dtype=torch.long)
    for layer, clusters in enumerate(relations):
        for pivot, satellites in (clusters or {}).items():
            for satellite in satellites:
                if not 0 <= int(satellite) < heads:
                    raise ProfileError(f"{path}: layer {layer} lists satellite {satellite} outside [0, {heads})")
                if pivots[layer, int(satellite)] != -1:
                    raise ProfileError(f"{path}: layer {layer}, KV head {satellite} is listed under two pivots")
                pivots[layer, int(satellite)] = int(pivot)
    return pivots

"""`HeadProfile`: the role of every KV head of one model, with the numbers behind it.

Tensors (all ``[layers, kv_heads]``):

- ``roles`` int64: :class:`Role` codes (anchor 1, volatile 2, pivot 3, satellite 4).
- ``stability`` float32: median overlap of each head's top-k set at decode steps with its
  prefill set, in [0, 1]. All NaN when unknown (``has_stability=False``, e.g. converted from a
  published file that has only roles and budget ratios).
- ``budget_ratios`` float32: share of the compression budget of each compressed head (anchor,
  satellite), normalised so that their mean over all compressed heads of the model is 1.
  NaN for full heads (volatile, pivot), which keep their whole KV.
- ``pivots`` int64: KV-head index (same layer) of each satellite's pivot; -1 for other roles.

A profile is validated when it is built; an invalid one raises :class:`ProfileError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ProfileError
from .roles import Role
from .validation import check_fits, check_shapes, check_structure


def _library_version() -> str:
    from .._version import __version__

    return __version__


@dataclass(eq=False, repr=False)
class HeadProfile:
    """Head taxonomy of one model (see the module docstring for the tensors).

    Args:
        roles: int ``[layers, kv_heads]`` role codes.
        stability: float ``[layers, kv_heads]``; ignored (set to NaN) when ``has_stability`` is False.
        budget_ratios: float ``[layers, kv_heads]``; values of full heads are ignored (set to NaN).
        pivots: int ``[layers, kv_heads]``; -1 except for satellites.
        model_name: Hub id or name of the profiled model, e.g. "meta-llama/Llama-3.1-8B-Instruct".
        num_attention_heads: query heads per layer.
        head_dim: dimension of one head.
        revision: model revision (commit) the profile was made from, if known.
        tau_stable: stability threshold (anchor if S >= tau_stable). Default 0.5.
        tau_sim: similarity threshold (neighbours if overlap >= tau_sim). Default 0.5.
        topk: size of the top-k position sets. Default 1024.
        calibration: description of the calibration run (texts, lengths, command, ...).
        source: provenance and attribution (who made it, from what, licence).
        library_version: heterocache version that wrote it.
        has_stability: whether ``stability`` holds measured scores.
        extra: free-form JSON-serialisable metadata.
    """

    roles: torch.Tensor
    stability: torch.Tensor
    budget_ratios: torch.Tensor
    pivots: torch.Tensor
    model_name: str
    num_attention_heads: int
    head_dim: int
    revision: str | None = None
    tau_stable: float | None = 0.5
    tau_sim: float | None = 0.5
    topk: int | None = 1024
    calibration: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    library_version: str = field(default_factory=_library_version)
    has_stability: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roles = _as_int(self.roles, "roles")
        self.pivots = _as_int(self.pivots, "pivots")
        self.stability = torch.as_tensor(self.stability, dtype=torch.float32).clone()
        self.budget_ratios = torch.as_tensor(self.budget_ratios, dtype=torch.float32).clone()
        check_shapes(self)  # before the masked writes below, which need equal shapes
        # Values that carry no meaning are normalised rather than rejected (e.g. -1 for full heads).
        self.budget_ratios[~self.compressed_mask()] = float("nan")
        if not self.has_stability:
            self.stability.fill_(float("nan"))
        check_structure(self)

    # ---- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.roles.shape[0])

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer."""
        return int(self.roles.shape[1])

    @property
    def num_heads(self) -> int:
        """KV heads of the whole model (layers × KV heads)."""
        return self.roles.numel()

    # ---- queries -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of KV heads of each role over the whole model, e.g. ``{"anchor": 10, ...}``."""
        return {role.label: int((self.roles == role).sum()) for role in Role}

    def layer_counts(self, layer: int) -> dict[str, int]:
        """Number of KV heads of each role in one layer."""
        return {role.label: int((self.roles[layer] == role).sum()) for role in Role}

    def heads(self, role: Role | int | str) -> list[tuple[int, int]]:
        """``(layer, kv_head)`` of every head with ``role``, in layer-major order."""
        return [tuple(x) for x in (self.roles == Role.parse(role)).nonzero().tolist()]

    def role_of(self, layer: int, head: int) -> Role:
        return Role(int(self.roles[layer, head]))

    def pivot_of(self, layer: int, head: int) -> int | None:
        """Pivot KV head of a satellite, None for other roles."""
        pivot = int(self.pivots[layer, head])
        return None if pivot < 0 else pivot

    def satellites_of(self, layer: int, pivot: int) -> list[int]:
        """KV heads of ``layer`` whose pivot is ``pivot`` (ascending).

        Raises:
            ValueError: ``pivot`` is not a pivot head.
        """
        if self.role_of(layer, pivot) is not Role.PIVOT:
            role = self.role_of(layer, pivot).with_article
            raise ValueError(f"layer {layer}, KV head {pivot} is {role}, not a pivot")
        return (self.pivots[layer] == pivot).nonzero().flatten().tolist()

    def clusters(self, layer: int) -> dict[int, list[int]]:
        """``{pivot: [satellites]}`` of one layer."""
        return {pivot: self.satellites_of(layer, pivot) for pivot in
                (self.roles[layer] == Role.PIVOT).nonzero().flatten().tolist()}

    def cluster_sizes(self) -> list[int]:
        """Size (pivot + satellites) of every cluster of the model."""
        return [1 + len(sats) for layer in range(self.num_layers) for sats in self.clusters(layer).values()]

    def compressed_mask(self) -> torch.Tensor:
        """bool ``[layers, kv_heads]``: True for anchor and satellite heads."""
        return (self.roles == Role.ANCHOR) | (self.roles == Role.SATELLITE)

    # ---- checks ------------------------------------------------------------------------------
    def validate(self) -> "HeadProfile":
        """Re-run the consistency checks (after editing tensors in place). Returns ``self``."""
        check_structure(self)
        return self

    def validate_for(self, config_or_model: Any) -> "HeadProfile":
        """Check that the profile fits a model, a transformers config or a dict of config fields.

        Raises:
            ProfileError: naming every mismatch of layers, query heads, KV heads or head_dim.
        Returns:
            ``self``, for chaining.
        """
        check_fits(self, config_or_model)
        return self

    # ---- files and the Hub -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as one ``.safetensors`` file (tensors + JSON metadata, no pickle)."""
        from .format import save_file

        save_file(self, path)

    def to_bytes(self) -> bytes:
        """The ``.safetensors`` file content of the profile."""
        from .format import to_bytes

        return to_bytes(self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeadProfile":
        """Read a profile file written by :meth:`save`."""
        from .format import load_file

        return load_file(path)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, revision: str | None = None, **kwargs: Any
    ) -> "HeadProfile":
        """Load a profile from a file, a folder, a bundled profile name or a Hub repository.

        See :func:`heterocache.profile.io.lookup.resolve_profile_file` for the lookup order and the
        keyword arguments (``filename``, ``cache_dir``, ``token``, ``local_files_only``).
        """
        from .io.lookup import resolve_profile_file

        return cls.load(resolve_profile_file(name_or_path, revision=revision, **kwargs))

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the profile to a Hub repository (see :func:`heterocache.profile.io.hub.push_to_hub`)."""
        from .io.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return (
            f"HeadProfile(model_name={self.model_name!r}, layers={self.num_layers}, "
            f"kv_heads={self.num_kv_heads}, q_heads={self.num_attention_heads}, head_dim={self.head_dim}, {counts})"
        )


def _as_int(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ProfileError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    return tensor.to(torch.int64).clone()

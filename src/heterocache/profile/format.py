"""The profile file format: one ``.safetensors`` file, tensors plus string metadata.

Tensors: ``roles`` (int8), ``stability`` (float32), ``budget_ratios`` (float32), ``pivots``
(int32), each ``[layers, kv_heads]``. Metadata (safetensors allows only str -> str): the plain
strings ``format`` = ``"heterocache.head_profile"`` and ``format_version``; every other entry is
JSON (``model_name``, ``revision``, ``shape``, ``thresholds``, ``topk``, ``calibration``,
``source``, ``library_version``, ``has_stability``, ``role_codes``, ``extra``).
A file without the format tag, or from a newer format version, is rejected. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .errors import ProfileError, ProfileNotFoundError
from .head_profile import HeadProfile
from .io.header import FORMAT_TAG, FORMAT_VERSION, PROFILE_FILENAME, check_format  # noqa: F401  (defined there)
from .roles import ROLE_CODES

_TENSOR_DTYPES = {
    "roles": torch.int8,
    "stability": torch.float32,
    "budget_ratios": torch.float32,
    "pivots": torch.int32,
}


def encode(profile: HeadProfile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of ``profile``, as written to the file."""
    tensors = {name: getattr(profile, name).to(dtype).contiguous() for name, dtype in _TENSOR_DTYPES.items()}
    fields: dict[str, Any] = {
        "model_name": profile.model_name,
        "revision": profile.revision,
        "shape": {
            "num_layers": profile.num_layers,
            "num_attention_heads": profile.num_attention_heads,
            "num_key_value_heads": profile.num_kv_heads,
            "head_dim": profile.head_dim,
        },
        "thresholds": {"tau_stable": profile.tau_stable, "tau_sim": profile.tau_sim},
        "topk": profile.topk,
        "calibration": profile.calibration,
        "source": profile.source,
        "library_version": profile.library_version,
        "has_stability": profile.has_stability,
        "role_codes": ROLE_CODES,
        "extra": profile.extra,
    }
    metadata = {"format": FORMAT_TAG, "format_version": str(FORMAT_VERSION)}
    # allow_nan=False: NaN is not JSON; metadata must stay readable by any JSON parser.
    metadata.update({key: json.dumps(value, allow_nan=False, sort_keys=True) for key, value in fields.items()})
    return tensors, metadata


def to_bytes(profile: HeadProfile) -> bytes:
    """The ``.safetensors`` content of ``profile`` (byte-identical for identical profiles)."""
    tensors, metadata = encode(profile)
    return _canonical(st_save(tensors, metadata=metadata))


def _canonical(raw: bytes) -> bytes:
    """Rewrite the safetensors header with sorted keys: safetensors writes its metadata map in
    hash order, so the same profile would give different bytes (and noisy diffs) on every save.
    Tensor offsets are relative to the data section, so only the header changes."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 with spaces
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def save_file(profile: HeadProfile, path: str | os.PathLike) -> Path:
    """Write ``profile`` to ``path`` (parent folders are created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_bytes(profile)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a reader never sees a half-written profile
    return path


def load_file(path: str | os.PathLike) -> HeadProfile:
    """Read a profile file.

    Raises:
        ProfileNotFoundError: no such file.
        ProfileError: not a safetensors file, a foreign safetensors file, a newer format version,
            missing or malformed fields, or an invalid taxonomy (the message starts with the path).
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileNotFoundError(f"no head profile file at {path}")
    try:
        return _load(path)
    except ProfileError as err:
        raise type(err)(f"{path}: {err}") from err


def _load(path: Path) -> HeadProfile:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            _check_format(metadata, path)
            names = set(f.keys())
            missing = sorted(set(_TENSOR_DTYPES) - names)
            if missing:
                raise ProfileError(f"missing tensors {missing}")
            tensors = {name: f.get_tensor(name) for name in _TENSOR_DTYPES}
    except SafetensorError as err:
        hint = ""
        with open(path, "rb") as raw:
            if raw.read(1) == b"{":
                hint = (" It looks like JSON: a published reference profile is converted with "
                        "`heterocache profile convert JSON --out PATH --model-name NAME ...`.")
        raise ProfileError(f"not a valid safetensors file ({err}).{hint}") from None

    fields = {key: _json_field(metadata, key) for key in metadata if key not in ("format", "format_version")}
    shape = _require(fields, "shape")
    thresholds = fields.get("thresholds") or {}
    profile = HeadProfile(
        roles=tensors["roles"],
        stability=tensors["stability"],
        budget_ratios=tensors["budget_ratios"],
        pivots=tensors["pivots"],
        model_name=_require(fields, "model_name"),
        num_attention_heads=_require(shape, "num_attention_heads"),
        head_dim=_require(shape, "head_dim"),
        revision=fields.get("revision"),
        tau_stable=thresholds.get("tau_stable"),
        tau_sim=thresholds.get("tau_sim"),
        topk=fields.get("topk"),
        calibration=fields.get("calibration") or {},
        source=fields.get("source") or {},
        library_version=fields.get("library_version") or "unknown",
        has_stability=bool(fields.get("has_stability", True)),
        extra=fields.get("extra") or {},
    )
    for key, actual in (("num_layers", profile.num_layers), ("num_key_value_heads", profile.num_kv_heads)):
        if key in shape and shape[key] != actual:
            raise ProfileError(f"metadata says {key}={shape[key]} but the tensors have {actual}")
    codes = fields.get("role_codes")
    if codes is not None and codes != ROLE_CODES:
        raise ProfileError(f"role codes {codes} differ from this library's {ROLE_CODES}")
    return profile


def _check_format(metadata: dict[str, str], path: Path) -> None:
    check_format(metadata)


def _json_field(metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ProfileError(f"metadata field {key!r} is not valid JSON: {metadata[key][:80]!r}") from None


def _require(fields: dict[str, Any], key: str) -> Any:
    if key not in fields or fields[key] is None:
        raise ProfileError(f"metadata field {key!r} is missing")
    return fields[key]

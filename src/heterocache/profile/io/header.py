"""What a profile file says about itself, read from its safetensors header alone.

A ``.safetensors`` file starts with the length of its JSON header (8 bytes, little-endian) and
the header: each tensor's dtype, shape and offsets, and the string metadata under
``"__metadata__"``. Reading it needs neither torch nor the safetensors package, so the command
line checks a profile (is it one, which model, which shape) before it imports torch or loads a
model. :func:`heterocache.profile.format.load_file` reads the whole file.

Standard library only.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

from ..errors import ProfileError, ProfileNotFoundError

FORMAT_TAG = "heterocache.head_profile"
FORMAT_VERSION = 1
#: Name of the profile file inside a folder or a Hub repository.
PROFILE_FILENAME = "heterocache_profile.safetensors"

# A profile's header is a few kB; anything far larger is not a profile (and is not read).
_MAX_HEADER_BYTES = 1 << 24


class ProfileHeader(NamedTuple):
    """Model name and attention shape of a profile file, from its header."""

    model_name: str | None
    revision: str | None
    num_layers: int
    num_attention_heads: int | None
    num_kv_heads: int
    head_dim: int | None


def read_metadata(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file's header: tensor name -> ``{"dtype", "shape",
    "data_offsets"}``, and the string metadata.

    Raises:
        ProfileNotFoundError: no such file.
        ProfileError: not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileNotFoundError(f"no head profile file at {path}")
    with open(path, "rb") as f:
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        text = f.read(length) if length is not None and 2 <= length <= _MAX_HEADER_BYTES else b""
    try:
        header = json.loads(text) if len(text) == length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        hint = ""
        if raw[:1] == b"{":
            hint = (" It looks like JSON: a published reference profile is converted with "
                    "`heterocache profile convert JSON --out PATH --model-name NAME ...`.")
        raise ProfileError(f"{path}: not a valid safetensors file.{hint}")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def check_format(metadata: dict[str, str]) -> None:
    """Raise :class:`ProfileError` unless ``metadata`` carries this library's format tag and a
    format version it reads."""
    tag = metadata.get("format")
    if tag != FORMAT_TAG:
        raise ProfileError(
            f"not a heterocache head profile (metadata 'format' is {tag!r}, expected {FORMAT_TAG!r})"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ProfileError(f"malformed format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ProfileError(
            f"profile format version {version} is newer than this library reads ({FORMAT_VERSION}); "
            "upgrade heterocache"
        )
    if version < 1:
        raise ProfileError(f"invalid profile format version {version}")


def is_profile_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata carries our format tag."""
    try:
        return read_metadata(path)[1].get("format") == FORMAT_TAG
    except (ProfileError, OSError):
        return False


def read_header(path: str | os.PathLike) -> ProfileHeader:
    """Model name and shape of the profile file at ``path`` (its header only).

    Raises:
        ProfileNotFoundError: no such file.
        ProfileError: not a safetensors file, not a profile, a newer format version, or a header
            without the ``roles`` tensor (the message starts with the path).
    """
    tensors, metadata = read_metadata(path)
    try:
        check_format(metadata)
        roles = tensors.get("roles")
        shape = roles.get("shape") if isinstance(roles, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape)):
            raise ProfileError(f"no [layers, kv_heads] 'roles' tensor (got shape {shape})")
        fields = {key: _json(metadata, key) for key in ("model_name", "revision", "shape")}
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None
    meta_shape = fields["shape"] if isinstance(fields["shape"], dict) else {}
    return ProfileHeader(
        model_name=fields["model_name"] if isinstance(fields["model_name"], str) else None,
        revision=fields["revision"] if isinstance(fields["revision"], str) else None,
        num_layers=shape[0],
        num_attention_heads=meta_shape.get("num_attention_heads"),
        num_kv_heads=shape[1],
        head_dim=meta_shape.get("head_dim"),
    )


def _json(metadata: dict[str, str], key: str):
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ProfileError(f"metadata field {key!r} is not valid JSON: {metadata[key][:80]!r}") from None

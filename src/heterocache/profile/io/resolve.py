"""Finding a profile file by name or path without loading it: a file, a folder, a bundled
profile, or the Hub.

Reads at most file headers (:mod:`.header`), so the command line resolves and checks a profile
before it imports torch. :mod:`.lookup` loads what this finds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...models import short_model_name
from ..errors import ProfileError, ProfileNotFoundError
from .bundled import bundled_profiles, closest_bundled, find_bundled
from .header import PROFILE_FILENAME, is_profile_file
from .hub import download_profile

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_profile_file(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    filename: str = PROFILE_FILENAME,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Local file of the profile named by ``name_or_path``. Tried in this order:

    1. an existing file;
    2. an existing folder: its ``filename`` (default ``heterocache_profile.safetensors``), else the
       only ``.safetensors`` file in it that is a head profile;
    3. a bundled profile (model name, case-insensitive, or a short model name such as "smollm2";
       skipped when ``revision`` is given, since a revision refers to a Hub repository);
    4. a Hub model repository id: ``filename`` at ``revision`` via ``hf_hub_download``
       (cache, token, offline mode and ``local_files_only`` as in huggingface_hub).

    Raises:
        ProfileNotFoundError: nothing found; the message lists what was tried.
        ProfileError: a folder holds several profiles.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return _profile_in_folder(path, filename)
    name = str(name_or_path)
    tried = [f"no file or folder '{name}'"]
    name = short_model_name(name) or name  # "smollm2": the bundled model's published name
    if revision is None:
        bundled = find_bundled(name)
        if bundled is not None:
            return bundled
        tried.append(f"not a bundled profile (bundled: {', '.join(bundled_profiles()) or 'none'})")
    if _REPO_ID.match(name):
        try:
            return download_profile(name, revision=revision, filename=filename, cache_dir=cache_dir,
                                    token=token, local_files_only=local_files_only)
        except ProfileNotFoundError as err:
            tried.append(str(err))
    raise ProfileNotFoundError(f"no head profile '{name}': " + "; ".join(tried) + _did_you_mean(name))


def _did_you_mean(name: str) -> str:
    close = closest_bundled(name)
    return f". Did you mean the bundled '{close}'?" if close is not None else ""


def _profile_in_folder(folder: Path, filename: str) -> Path:
    if (folder / filename).is_file():
        return folder / filename
    candidates = [p for p in sorted(folder.glob("*.safetensors")) if is_profile_file(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ProfileNotFoundError(f"folder {folder} has no '{filename}' and no other head profile file")
    raise ProfileError(f"folder {folder} holds several head profiles {[p.name for p in candidates]}; pass the file")


def suggested_filename(model_name: str) -> str:
    """File name for a model's profile, named like the bundled ones: ``org--model.safetensors``
    for a Hub id, ``<last path component>.safetensors`` for a local path."""
    name = str(model_name).strip().rstrip("/\\").replace("\\", "/")
    if Path(model_name).exists() or name.startswith((".", "/")) or name.count("/") != 1:
        name = name.split("/")[-1]
    for suffix in (".gguf", ".safetensors"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return name.replace("/", "--") + ".safetensors"

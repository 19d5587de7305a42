"""Where a profile comes from: a file, a folder, a bundled profile, or the Hub."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import ProfileError, ProfileNotFoundError
from ..format import FORMAT_TAG, PROFILE_FILENAME, load_file
from ..head_profile import HeadProfile
from .bundled import bundled_profiles, closest_bundled, find_bundled
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
    3. a bundled profile (model name, case-insensitive; skipped when ``revision`` is given, since
       a revision refers to a Hub repository);
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
    candidates = [p for p in sorted(folder.glob("*.safetensors")) if _is_profile_file(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ProfileNotFoundError(f"folder {folder} has no '{filename}' and no other head profile file")
    raise ProfileError(f"folder {folder} holds several head profiles {[p.name for p in candidates]}; pass the file")


def _is_profile_file(path: Path) -> bool:
    """True when the safetensors header carries our format tag (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_TAG
    except (SafetensorError, OSError):
        return False


def suggested_filename(model_name: str) -> str:
    """File name for a model's profile, named like the bundled ones: ``org--model.safetensors``
    for a Hub id, ``<last path component>.safetensors`` for a local path."""
    name = str(model_name).strip().rstrip("/\\").replace("\\", "/")
    if Path(model_name).exists() or name.startswith((".", "/")) or name.count("/") != 1:
        name = name.split("/")[-1]
    for suffix in (".gguf", ".safetensors"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return name.replace("/", "--") + ".safetensors"


def profile_for_model(
    model_or_name: Any,
    *,
    revision: str | None = None,
    use_hub: bool = True,
    validate: bool = True,
    **hub_kwargs: Any,
) -> HeadProfile:
    """The head profile of a loaded model (by ``model.config.name_or_path``) or of a model name.

    Looks in the model's local folder (``heterocache_profile.safetensors`` beside the weights),
    then among the bundled profiles, then in the model's Hub repository (``use_hub``; see
    :func:`resolve_profile_file` for ``hub_kwargs``). A profile found for a model object is
    checked against its config (``validate``).

    Raises:
        ProfileNotFoundError: no profile anywhere; the message shows the command that makes one.
        ProfileError: the profile found does not fit the model.
    """
    if isinstance(model_or_name, (str, os.PathLike)):
        name, model = str(model_or_name), None
    else:
        model = model_or_name
        config = getattr(model, "config", model)
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or ""
        if not name:
            raise ProfileNotFoundError(
                "the model has no config.name_or_path to look its profile up by; "
                "load one with HeadProfile.from_pretrained(PATH)"
            )
    if model is not None:
        from ...models import known_model_name

        name = known_model_name(name) or name  # e.g. the bundled SmolLM2 named by its package folder
    try:
        profile = _find(name, revision=revision, use_hub=use_hub, **hub_kwargs)
    except ProfileNotFoundError as err:
        if model is None or revision is not None:
            raise
        profile = _bundled_by_shape(model, name, err)
    if model is not None and validate:
        profile.validate_for(model)
    return profile


def _bundled_by_shape(model: Any, name: str, not_found: ProfileNotFoundError) -> HeadProfile:
    """The one bundled profile whose shape fits ``model``, for a model whose name says nothing
    (e.g. loaded from a local GGUF file: its name is the folder). Warns which one was taken;
    re-raises ``not_found`` when none fits and refuses to guess between several."""
    import warnings

    from ..validation import check_fits

    fitting = []
    for bundled_name, path in bundled_profiles().items():
        profile = load_file(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the name differs by definition here
                check_fits(profile, model)
        except ProfileError:
            continue
        fitting.append((bundled_name, profile))
    if not fitting:
        raise not_found
    if len(fitting) > 1:
        raise ProfileNotFoundError(
            f"no head profile named for model '{name}', and several bundled profiles fit its shape: "
            f"{', '.join(n for n, _ in fitting)}; pass one, e.g. HeteroCache('{fitting[0][0]}', ...)"
        ) from not_found
    bundled_name, profile = fitting[0]
    warnings.warn(
        f"no head profile named for model '{name}'; using the bundled profile of '{bundled_name}', the only "
        f"one whose shape fits it. Pass the profile explicitly (HeteroCache('{bundled_name}', ...)) to "
        "silence this, or profile the model if it is another one of that shape.",
        stacklevel=3,
    )
    return profile


def _find(name: str, *, revision: str | None, use_hub: bool, **hub_kwargs: Any) -> HeadProfile:
    tried = []
    filename = hub_kwargs.pop("filename", PROFILE_FILENAME)
    folder = Path(name)
    if folder.is_dir():
        if (folder / filename).is_file():
            return load_file(folder / filename)
        tried.append(f"no {filename} in the model folder {folder}")
    if revision is None:
        bundled = find_bundled(name)
        if bundled is not None:
            return load_file(bundled)
        tried.append(f"not bundled (bundled: {', '.join(bundled_profiles()) or 'none'})")
    else:
        tried.append(f"bundled profiles skipped (revision {revision!r} refers to the Hub)")
    if use_hub and _REPO_ID.match(name) and not folder.exists():
        try:
            return load_file(download_profile(name, revision=revision, filename=filename, **hub_kwargs))
        except ProfileNotFoundError as err:
            tried.append(f"not on the Hub: {err}")
    out = suggested_filename(name)
    raise ProfileNotFoundError(
        f"no head profile for model '{name}': " + "; ".join(tried) + _did_you_mean(name) + ".\n"
        f"Profile the model once with:\n    heterocache profile run {name} --out {out}\n"
        f"then load it with HeadProfile.from_pretrained('{out}') "
        f"(or publish it with profile.push_to_hub('{name}') to make profile_for_model find it)."
    )

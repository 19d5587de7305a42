"""Where a profile comes from: a file, a folder, a bundled profile, or the Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ProfileError, ProfileNotFoundError
from ..format import PROFILE_FILENAME, load_file
from ..head_profile import HeadProfile
from .bundled import bundled_profiles, find_bundled
from .hub import download_profile

# resolving a name to a file reads no tensors (torch-free); re-exported here, where it always was
from .resolve import _REPO_ID, _did_you_mean, resolve_profile_file, suggested_filename  # noqa: F401


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
    from ...models import known_model_name, short_model_name

    if model is not None:
        name = known_model_name(name) or name  # e.g. the bundled SmolLM2 named by its package folder
    elif not Path(name).exists():
        name = short_model_name(name) or name  # "smollm2"
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

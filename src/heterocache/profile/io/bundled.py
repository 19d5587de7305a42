"""Profiles shipped with heterocache, found by model name.

Files are named ``<org>--<model>.safetensors`` (the Hub id with "/" written as "--"). In a wheel
they live in the package folder ``heterocache/_bundled_profiles`` (pyproject force-include of the
repository's ``profiles/``); in an editable or source checkout, in the repository's ``profiles/``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ProfileError

_SUFFIX = ".safetensors"


def bundled_dir() -> Path | None:
    """Folder holding the bundled profiles, or None when there is none."""
    package_dir = Path(__file__).resolve().parents[2]  # .../heterocache
    for candidate in (package_dir / "_bundled_profiles", package_dir.parents[1] / "profiles"):
        if candidate.is_dir():
            return candidate
    return None


def bundled_profiles() -> dict[str, Path]:
    """``{model name: file}`` of every bundled profile, e.g. ``"meta-llama/Llama-3.1-8B-Instruct"``."""
    folder = bundled_dir()
    if folder is None:
        return {}
    return {path.stem.replace("--", "/"): path for path in sorted(folder.glob(f"*{_SUFFIX}"))}


def find_bundled(name: str) -> Path | None:
    """File of the bundled profile for ``name``, or None.

    Matching is case-insensitive. ``org/model`` (or ``org--model``) must match the full name;
    a bare model name ("llama-3.1-8b-instruct") or a local path matches on its last component.

    Raises:
        ProfileError: a bare name matches several bundled profiles.
    """
    query = str(name).strip().rstrip("/\\")
    if query.lower().endswith(_SUFFIX):
        query = query[: -len(_SUFFIX)]
    query = query.replace("--", "/").replace("\\", "/")
    profiles = bundled_profiles()
    is_hub_id = query.count("/") == 1 and not Path(name).exists() and not query.startswith((".", "/"))
    if is_hub_id:
        matches = [path for key, path in profiles.items() if key.lower() == query.lower()]
    else:
        short = query.split("/")[-1].lower()
        matches = [path for key, path in profiles.items() if key.split("/")[-1].lower() == short]
    if len(matches) > 1:
        raise ProfileError(
            f"'{name}' matches several bundled profiles: {[p.stem.replace('--', '/') for p in matches]}; "
            "give the full name org/model"
        )
    return matches[0] if matches else None


def closest_bundled(name: str) -> str | None:
    """The bundled profile name closest to ``name`` (a likely typo), or None when none is close."""
    import difflib

    names = list(bundled_profiles())
    query = str(name).strip().replace("--", "/").lower()
    lowered = {n.lower(): n for n in names}
    short = {n.split("/")[-1].lower(): n for n in names}
    match = difflib.get_close_matches(query, list(lowered), n=1, cutoff=0.8)
    if match:
        return lowered[match[0]]
    match = difflib.get_close_matches(query.split("/")[-1], list(short), n=1, cutoff=0.8)
    return short[match[0]] if match else None

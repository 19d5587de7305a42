"""Head profiles: which KV heads of a model are anchor, volatile, pivot or satellite.

A :class:`HeadProfile` is made once per model by the profiler (:func:`profile_model`,
``heterocache profile run``), stored as one ``.safetensors`` file, and loaded by path, bundled
name or Hub repository (:meth:`HeadProfile.from_pretrained`, :func:`profile_for_model`).

Names that need torch are loaded on first use, so that ``heterocache profile list`` (which
imports :mod:`.cli`) starts without it.
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .errors import ProfileError, ProfileNotFoundError  # noqa: F401  (public, in __all__)
from .io.bundled import bundled_profiles  # noqa: F401  (public, in __all__)
from .roles import Role  # noqa: F401  (public, in __all__)

# public name -> submodule defining it (all of them import torch)
_LAZY = {
    "FORMAT_TAG": "format",
    "FORMAT_VERSION": "format",
    "PROFILE_FILENAME": "format",
    "HeadProfile": "head_profile",
    "profile_for_model": "io.lookup",
    # the profiler also imports transformers' attention machinery
    "ProfilerSettings": "profiler",
    "profile_model": "profiler",
}

__all__ = sorted(["ProfileError", "ProfileNotFoundError", "Role", "bundled_profiles", *_LAZY])


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)

"""Head profiles: which KV heads of a model are anchor, volatile, pivot or satellite.

A :class:`HeadProfile` is made once per model by the profiler (:func:`profile_model`,
``heterocache profile run``), stored as one ``.safetensors`` file, and loaded by path, bundled
name or Hub repository (:meth:`HeadProfile.from_pretrained`, :func:`profile_for_model`).
"""

from .errors import ProfileError, ProfileNotFoundError
from .format import FORMAT_TAG, FORMAT_VERSION, PROFILE_FILENAME
from .head_profile import HeadProfile
from .io.bundled import bundled_profiles
from .io.lookup import profile_for_model
from .roles import Role

__all__ = [
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "PROFILE_FILENAME",
    "HeadProfile",
    "ProfileError",
    "ProfileNotFoundError",
    "ProfilerSettings",
    "Role",
    "bundled_profiles",
    "profile_for_model",
    "profile_model",
]


def __getattr__(name: str):
    # The profiler imports transformers' attention machinery; load it only when asked for.
    if name in ("profile_model", "ProfilerSettings"):
        from . import profiler

        return getattr(profiler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

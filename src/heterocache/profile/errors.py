"""Errors raised by the head-profile feature."""

from __future__ import annotations


class ProfileError(ValueError):
    """A head profile is malformed, foreign, or does not fit the model it is used with."""


class ProfileNotFoundError(ProfileError):
    """No head profile could be found for a name, path, bundled entry or Hub repository."""

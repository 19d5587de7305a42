"""FullKV: keep every token (the uncompressed reference on the ragged engine)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass
class FullKVPolicy(Policy):
    """Keeps the whole prompt and every decoded token. Gives exactly DynamicCache's tokens."""

    name = "fullkv"

"""The package's one environment variable, ``HETEROCACHE_DECODE``: how decode attention runs,
for benchmarks and debugging (code passes the same choices as arguments).

    HETEROCACHE_DECODE="strategy=device,backend=torch"    # each key optional; default auto

``strategy`` (:func:`heterocache.attention.plan.resolve_strategy`): auto, device, segments, blocks,
kernel. ``backend`` (:func:`heterocache.attention.kernels.resolve_backend`): auto, torch, triton,
flash.
"""

from __future__ import annotations

import os

ENV_VAR = "HETEROCACHE_DECODE"
KEYS = ("strategy", "backend")


def decode_setting(key: str) -> str:
    """The value of ``key`` in ``$HETEROCACHE_DECODE`` (lower case), "auto" when not set.

    Raises:
        ValueError: the variable is not a comma-separated list of ``key=value`` with known keys.
    """
    found = {}
    for item in os.environ.get(ENV_VAR, "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in KEYS:
            raise ValueError(f"${ENV_VAR} must be comma-separated key=value with keys {KEYS}, got {item.strip()!r}")
        found[name] = value.strip().lower()
    return found.get(key) or "auto"

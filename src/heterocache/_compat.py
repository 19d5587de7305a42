"""transformers version differences, bridged in one place."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model(...)``: ``{"cache": cache}`` where the model's
    forward takes ``cache`` (transformers 5.24 renamed it and deprecates ``past_key_values``, with
    removal announced for 5.40), else ``{"past_key_values": cache}`` (earlier 5.x)."""
    return {_cache_keyword(type(model)): cache}

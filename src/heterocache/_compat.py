"""transformers version differences, bridged in one place."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model(...)`` and to ``model.generate(...)``.

    ``{"cache": cache}`` where the model's forward takes ``cache``, else
    ``{"past_key_values": cache}`` (transformers before 5.24). transformers 5.24 renamed the
    keyword of both in the same release: the models' forward deprecates ``past_key_values`` with
    removal announced for 5.40, ``GenerationMixin.generate`` (whose signature is ``**kwargs``, so
    it can't be asked) with removal announced for 6.0. The forward signature therefore decides
    for both."""
    return {_cache_keyword(type(model)): cache}

"""The cache keyword bridge between transformers versions."""

from __future__ import annotations

import warnings

import torch

from helpers import tiny_model
from heterocache._compat import cache_kwarg
from heterocache.engine.registry import make_cache
from heterocache.eval.shared_prefill import PrefillTarget, greedy_continue, prefill_many


class _OldForward:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


class _NewForward:
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return cache


def test_the_keyword_follows_the_forward_signature():
    marker = object()
    assert cache_kwarg(_OldForward(), marker) == {"past_key_values": marker}
    assert cache_kwarg(_NewForward(), marker) == {"cache": marker}
    assert _NewForward().forward(**cache_kwarg(_NewForward(), marker)) is marker


def test_our_forward_calls_raise_no_deprecation_warning():
    model = tiny_model()
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = make_cache("snapkv", 0.5, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = prefill_many(model, ids, [PrefillTarget(cache, 40)])
        greedy_continue(model, cache, 3, set(), logits=logits)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert cache.get_seq_length() == 42


def test_generate_takes_the_same_keyword_without_a_warning():
    """transformers renamed the keyword of forward and of generate in the same release, so the
    forward signature decides for generate too."""
    model = tiny_model()
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    cache = make_cache("snapkv", 0.5, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False)
    assert not [w for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    assert out.shape[1] == 27 and cache.get_seq_length() == 26  # the cache handed over is the one used

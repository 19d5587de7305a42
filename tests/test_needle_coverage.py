"""benchmarks/needle_coverage.py's helpers: the needle's value span and each compressed head's share of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from heterocache import HeteroCache
from heterocache._compat import cache_kwarg
from heterocache.profile import Role
from heterocache.profile.testing import toy_profile

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "needle_coverage.py"
    spec = importlib.util.spec_from_file_location("needle_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_value_span_is_the_first_occurrence_and_missing_values_raise():
    bench = _bench()
    assert bench.value_span([5, 1, 2, 3, 9, 1, 2, 3], [1, 2, 3]) == range(1, 4)
    with pytest.raises(ValueError, match="not in the prompt"):
        bench.value_span([1, 2, 4], [2, 3])


def test_head_coverage_is_each_compressed_heads_kept_share_of_the_span():
    bench = _bench()
    model = tiny_model("llama", num_hidden_layers=3, hidden_size=128, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=16)
    profile = toy_profile()
    L = 96
    ids = torch.randint(1, 256, (1, L), generator=torch.Generator().manual_seed(0))
    cache = HeteroCache(profile, budget=0.6)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache))
    span = range(30, 40)
    got = bench.head_coverage(cache, span)
    # The same from the stored positions, head by head in (layer, head) order.
    want = []
    for layer_idx, layer in enumerate(cache.layers):
        for h in range(layer.store.num_heads):
            if Role(int(profile.roles[layer_idx, h])) in (Role.ANCHOR, Role.SATELLITE):
                kept = set(layer.store.segment(h)[2].tolist())
                want.append(sum(p in kept for p in span) / len(span))
    assert len(got) == len(profile.heads("anchor")) + len(profile.heads("satellite"))
    np.testing.assert_allclose(got, want)
    assert 0 < got.mean() < 1  # compressed heads keep part of the prompt at this budget
    full = bench.head_coverage(cache, range(L - 1, L))  # the last prompt token is always kept
    assert (full == 1).all()

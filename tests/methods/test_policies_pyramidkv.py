"""PyramidKV: SnapKV's selection under per-layer budgets that shrink linearly bottom to top."""

from __future__ import annotations

import pytest
import torch
from test_policies_common import padded_batch, random_ctx

from helpers import tiny_model
from heterocache import PyramidKVCache
from heterocache._compat import cache_kwarg
from heterocache.methods.pyramidkv import PyramidKVPolicy, pyramid_budgets
from heterocache.methods.snapkv import SnapKVPolicy
from heterocache.policy.budget import tokens_for_budget


def test_hand_computed_schedule():
    # k = 10 with window 2: c = 8 beyond the window; top = 8/4 = 2, bottom = 2*8 - 2 = 14.
    out = pyramid_budgets(torch.tensor([10]), torch.tensor([100]), window=2, num_layers=3, beta=4.0)
    assert out.tolist() == [[16, 10, 4]]


def test_bottom_layer_capped_by_the_prompt_moves_the_top_up():
    # n = 12: at most 10 beyond the window; bottom = 10, top = 2*8 - 10 = 6.
    out = pyramid_budgets(torch.tensor([10]), torch.tensor([12]), window=2, num_layers=3, beta=4.0)
    assert out.tolist() == [[12, 10, 8]]


@pytest.mark.parametrize("num_layers", [1, 2, 7, 32])
def test_layer_budgets_average_to_the_budget_and_decrease(num_layers):
    n = torch.tensor([1000, 517, 80, 33, 7, 1])
    for budget in (0.05, 0.1, 0.25, 0.5, 1.0):
        k = tokens_for_budget(budget, n)
        out = pyramid_budgets(k, n, window=8, num_layers=num_layers, beta=20.0)
        assert torch.equal(out.sum(-1), k * num_layers)  # exactly the uniform total
        assert bool((out[:, 1:] <= out[:, :-1]).all())  # bottom to top
        assert bool((out <= n[:, None]).all()) and bool((out >= torch.clamp(k, max=8)[:, None]).all())


def test_stored_tokens_follow_the_schedule_in_every_layer_and_head():
    model = tiny_model("qwen2", num_hidden_layers=4)
    ids, mask = padded_batch((64, 45))
    cache = PyramidKVCache(budget=0.25, window=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.end_prompt()
    n = mask.sum(-1)
    expected = pyramid_budgets(tokens_for_budget(0.25, n), n, 4, 4, 20.0)
    report = cache.memory_report()
    for layer in report.layers:
        assert layer.stored_tokens == expected[:, layer.layer_idx, None].expand(2, 2).tolist()
    # Row 0: k = 16, c = 12 over 4 layers: 23.4, 15.8, 8.2, 0.6 -> 23, 16, 8, 1 (sum 48) + window 4.
    assert expected[0].tolist() == [27, 20, 12, 5]


def test_selection_is_snapkvs_at_the_layers_budget():
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[0, :12] = False
    for layer in range(3):
        ctx = random_ctx(layer, valid, num_layers=3, seed=layer)
        pyramid = PyramidKVPolicy(budget=0.3, window=4)
        plan = pyramid.plan(ctx)
        assert torch.equal(pyramid.select(ctx, plan), SnapKVPolicy(budget=0.3, window=4).select(ctx, plan))


def test_beta_one_is_uniform_snapkv():
    valid = torch.ones(1, 50, dtype=torch.bool)
    ctx = random_ctx(2, valid, num_layers=3)
    assert torch.equal(PyramidKVPolicy(budget=0.3, beta=1.0).plan(ctx), SnapKVPolicy(budget=0.3).plan(ctx))


def test_missing_layer_count_is_a_clear_error():
    ctx = random_ctx(0, torch.ones(1, 20, dtype=torch.bool), num_layers=None)
    with pytest.raises(ValueError, match="layer count"):
        PyramidKVPolicy().plan(ctx)


def test_beta_below_one_is_rejected():
    with pytest.raises(ValueError, match="beta"):
        PyramidKVPolicy(beta=0.5)

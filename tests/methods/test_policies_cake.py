"""CAKE: layer preferences from window attention, capped proportional budgets, cascading eviction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_policies_common import EachStep, decode_step, padded_batch, positions, prefill, random_ctx
from transformers import LogitsProcessorList

from helpers import tiny_model
from heterocache import CAKECache
from heterocache._compat import cache_kwarg
from heterocache.methods.cake import CAKEPolicy
from heterocache.policy.budget import allocate_proportional, round_preserving_sum, tokens_for_budget
from heterocache.store.ragged import RaggedKVStore


def test_preference_and_indicator_follow_the_papers_definitions():
    L, H, G, w = 30, 2, 3, 6
    ctx = random_ctx(0, torch.ones(1, L, dtype=torch.bool), H=H, G=G, num_layers=2, seed=2)
    policy = CAKEPolicy(window=w, tau1=1.5, tau2=0.7, gamma=50.0)
    pref, indicator = policy.preference_and_indicator(ctx)
    # Oracle: the window's attention matrix, written out densely (eager).
    k = ctx.key.repeat_interleave(G, dim=1)
    s = ctx.query[:, :, -w:] @ k.transpose(-1, -2) * ctx.scaling  # [1, Hq, w, L]
    causal = torch.arange(L)[None, :] <= torch.arange(L - w, L)[:, None]
    A = torch.softmax(s.masked_fill(~causal, float("-inf")), -1).double()
    before = A[..., : L - w]
    dispersion = -(before * before.log()).sum()
    shift = before.var(dim=-2).sum()  # unbiased, over the window queries
    assert pref.item() == pytest.approx((dispersion ** (1 / 1.5) * shift ** (1 / 0.7)).item(), rel=1e-4)
    ind = (A.mean(-2) + 50.0 * A.var(-2))[..., : L - w].float()
    ind = F.avg_pool1d(ind.reshape(-1, 1, L - w), 5, stride=1, padding=2).view(1, H, G, L - w).mean(2)
    assert torch.allclose(indicator[..., : L - w], ind, rtol=1e-4, atol=1e-7)
    assert bool((indicator[..., L - w :] == 0).all())


def _layers(valid, num_layers, seed=0):
    return [random_ctx(i, valid, num_layers=num_layers, seed=seed + i) for i in range(num_layers)]


def test_cascade_allocates_the_total_by_preference_with_caps():
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :21] = False
    m, window = 4, 4
    ctxs = _layers(valid, m)
    policy = CAKEPolicy(budget=0.25, window=window)
    stores = prefill(policy, ctxs)
    n = valid.sum(-1)
    k = tokens_for_budget(0.25, n)
    c = k - window
    prefs = torch.stack([CAKEPolicy(window=window).preference_and_indicator(ctx)[0] for ctx in ctxs], -1)
    cap = n - window
    expected = round_preserving_sum(allocate_proportional(m * c, prefs, cap), cap[:, None].expand(2, m))
    assert torch.equal(policy.layer_budgets(), expected)
    stored = torch.stack([s.lengths() for s in stores], -1)  # [B, H, m]
    assert torch.equal(stored, (expected + window)[:, None, :].expand(2, 2, m))
    assert torch.equal(stored.sum(-1), (m * k)[:, None].expand(2, 2))  # budgets sum to the total
    assert len(set(expected[0].tolist())) > 1  # layers differ


def test_cascade_keeps_memory_within_the_total_and_ends_like_one_final_split():
    valid = torch.ones(1, 80, dtype=torch.bool)
    m, window, k = 5, 4, 20
    results, peaks = {}, {}
    for cascade in (True, False):
        policy = CAKEPolicy(budget_tokens=k, window=window, cascade=cascade)
        stores, peak = [], 0
        for ctx in _layers(valid, m, seed=7):
            plan = policy.plan(ctx)
            keep = policy.select(ctx, plan)
            store = RaggedKVStore(1, 2, 8, torch.float32, torch.device("cpu"), 8, 4)
            store.fill(ctx.key, ctx.value, keep, torch.arange(80))
            stores.append(store)
            policy.on_prefill_done(ctx.layer_idx, store, ctx)
            held = sum(int(s.length[0]) for s in stores)  # tokens held by head 0 of all layers so far
            peak = max(peak, held)
            if cascade:
                assert held <= m * (k - window) + len(stores) * window
        results[cascade] = [[positions(s, h).tolist() for h in range(2)] for s in stores]
        peaks[cascade] = peak
    assert results[True] == results[False]
    assert peaks[True] <= m * k < peaks[False]


def test_decode_keeps_every_layer_at_its_budget():
    model = tiny_model("qwen3", num_hidden_layers=4)
    ids, mask = padded_batch((64, 45))
    cache = CAKECache(budget=0.25, window=4)
    seen = []
    # end_prompt: after the prefill forward the prompt is still open (the first step would end it)
    check = EachStep(lambda: cache.end_prompt() or seen.append(torch.stack(cache.stored_tokens(), -1)))
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=12, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([check]))
    budgets = cache.policy.layer_budgets() + 4  # [B, m]
    for stored in seen:
        assert torch.equal(stored, budgets[:, None, :].expand(2, 2, 4))
    assert torch.equal(seen[0].sum(-1), 4 * tokens_for_budget(0.25, mask.sum(-1))[:, None].expand(2, 2))


def test_decode_evicts_the_lowest_pooled_attention_outside_the_window():
    valid = torch.ones(1, 40, dtype=torch.bool)
    H, G, D, window = 2, 3, 8, 4
    ctx = random_ctx(0, valid, H=H, G=G, D=D, num_layers=1, seed=11)
    policy = CAKEPolicy(budget_tokens=16, window=window)
    (store,) = prefill(policy, [ctx])
    before = [store.segment(h) for h in range(H)]
    before = [(k.clone(), p.clone()) for k, _, p in before]
    g = torch.Generator().manual_seed(12)
    q, k_new = torch.randn(1, H * G, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)
    decode_step(policy, [store], [q], [k_new], 40)
    for h in range(H):
        keys = torch.cat([before[h][0], k_new[0, h]], 0)  # 17 tokens
        pos = before[h][1].tolist() + [40]
        p = torch.softmax(q[0, h * G : (h + 1) * G, 0] @ keys.T * D**-0.5, -1)  # [G, 17]
        p = p[:, : 17 - window]  # tokens outside the recent window
        p = F.avg_pool1d(p[:, None, :], 5, stride=1, padding=2)[:, 0].mean(0)
        victim = pos[int(p.argmin())]
        assert positions(store, h).tolist() == [x for x in pos if x != victim]


def test_rows_of_different_length_get_their_own_budgets():
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = padded_batch((64, 40))
    cache = CAKECache(budget_tokens=12, window=4, evict_during_decode=False)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.end_prompt()
    stored = torch.stack(cache.stored_tokens(), -1)
    assert torch.equal(stored.sum(-1), torch.full((2, 2), 36))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"tau1": 0}, "tau1"), ({"tau2": -1.0}, "tau2"), ({"gamma": -1}, "gamma"), ({"window": 0}, "window"),
     ({"kernel": 4}, "kernel"), ({"pooling": "median"}, "pooling")],
)
def test_invalid_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAKEPolicy(**kwargs)

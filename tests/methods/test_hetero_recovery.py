"""HeteroCache's token recovery at a new turn (``turn_reselect="own"``): every compressed head
with a host copy (anchors keep one for it) re-chooses its prompt slots from the attention of its
own turn queries over its full prompt keys. Tiny random models, the toy profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache._compat import cache_kwarg
from heterocache.methods.heterocache import HeteroCache, HeteroCachePolicy
from heterocache.profile.testing import toy_profile

TOY_SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
G, D = 2, 16  # toy model: 8 query heads over 4 KV heads, head_dim 16
OWN = dict(budget=0.75, turn_reselect="own")


def toy_model():
    return tiny_model("llama", **TOY_SHAPE)


def _ids(B=1, L=120, seed=0):
    return torch.randint(1, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def _two_turns(model, cache, B=2, pad=20, L=120, q_len=12):
    """Prefill ``L`` tokens (row 1 left-padded by ``pad``), then a question of ``q_len`` tokens;
    returns the prompt's mask and the turn's query of every layer as the policy saw it."""
    ids, mask = _ids(B=B, L=L), torch.ones(B, L, dtype=torch.long)
    if B > 1:
        mask[1, :pad] = 0
    queries = {}
    before = cache.policy.before_extend

    def spy(layer_idx, store, query, scaling):
        queries[layer_idx] = query.clone()
        return before(layer_idx, store, query, scaling)

    cache.policy.before_extend = spy
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.end_prompt()
        turn_mask = torch.cat([mask, torch.ones(B, q_len, dtype=torch.long)], 1)
        model(_ids(B=B, L=q_len, seed=3), attention_mask=turn_mask, **cache_kwarg(model, cache))
    cache.policy.synchronize()
    return ids, mask, queries


def _reference_prompt(model):
    """``_two_turns``' prompt in a DynamicCache (the full prompt keys and values), and its mask."""
    reference = DynamicCache()
    ids, mask = _ids(B=2), torch.ones(2, 120, dtype=torch.long)
    mask[1, :20] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, reference))
    return reference, mask


def test_turn_reselect_own_replaces_the_pivot_refill_of_reselected_satellites_only():
    model = toy_model()
    cache = HeteroCache(toy_profile(), **OWN)
    _two_turns(model, cache, B=1)
    # Layer 0's pivot 0 has satellites 1 and 2, both re-chosen on their own: no pivot refill there;
    # at B=1 every satellite of the toy profile at this budget is re-chosen (layer 2's too).
    marks = cache.policy.reselected_for(120)
    satellites = [(layer, head) for layer, head in toy_profile().heads("satellite")]
    assert all(marks[layer, head] for layer, head in satellites)
    assert cache.stats()["satellite_refills"] == 0 and cache.stats()["refreshes"] > 0


def test_budget_one_gives_the_tokens_of_dynamic_cache_over_two_turns():
    model = toy_model()
    question = _ids(L=12, seed=3)
    outs = []
    for cache in (DynamicCache(), HeteroCache(toy_profile(), budget=1.0, turn_reselect="own")):
        out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False)
        outs.append(model.generate(torch.cat([out, question], 1), **cache_kwarg(model, cache), max_new_tokens=6,
                                   do_sample=False))
    assert torch.equal(outs[0], outs[1])


# Two turns at budget 0.5 with the defaults of the code before turn_reselect existed (commit e7254ef;
# kernel 5 then, "auto" since).
GOLDEN = [183, 183, 183, 183, 115, 206, 17, 204, 38, 73, 56, 91, 226, 201, 167, 50, 155, 232, 110, 146, 10, 206,
          183, 110, 146, 110]


def test_options_off_give_the_previous_default_tokens():
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.5, turn_reselect="pivot", kernel=5)
    out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=6, do_sample=False)
    out = model.generate(torch.cat([out, _ids(L=12, seed=3)], 1), **cache_kwarg(model, cache), max_new_tokens=8,
                         do_sample=False)
    assert out[0, 120:].tolist() == GOLDEN
    assert cache.stats()["reselected_heads"] == 0


@pytest.mark.parametrize("params,copied", [
    (dict(turn_reselect="pivot"), ("satellite",)),
    ({}, ("satellite", "anchor")),  # turn_reselect="own" by default: the default cache is meant for further turns
])
def test_anchors_keep_host_copies_exactly_when_a_turn_rechooses_them(params, copied):
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.5, **params, pivot_offload=False)
    with torch.no_grad():
        model(_ids(B=2, L=64), **cache_kwarg(model, cache))
        cache.end_prompt()
    heads = sum(len(toy_profile().heads(role)) for role in copied)
    assert cache.memory_report().host_bytes == 2 * heads * 64 * D * 4 * 2  # rows x heads x tokens x D x fp32 x KV


def test_reselection_follows_row_changes():
    model = toy_model()
    cache = HeteroCache(toy_profile(), **OWN)
    ids, mask = _ids(B=2), torch.ones(2, 120, dtype=torch.long)
    mask[1, :20] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.end_prompt()
        cache.batch_select_indices(torch.tensor([1]))  # keep the padded row only
        model(_ids(L=12, seed=3), attention_mask=torch.ones(1, 132, dtype=torch.long), **cache_kwarg(model, cache))
    policy = cache.policy
    assert cache.stats()["reselected_heads"] == int(policy.reselected_for(100).sum())
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        for head in np.nonzero(state.turn.marks[0])[0]:
            n = int(state.plan[0, head])
            _, _, pos = store.segment(int(head))
            assert bool((pos[:n] >= 20).all()) and bool((pos[:n].diff() > 0).all())


def test_bad_recovery_parameters_are_rejected():
    with pytest.raises(ValueError, match="turn_reselect"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="mine")
    # Without host copies nothing can be re-chosen: the paper's single-turn behaviour, no anchor copies.
    fixed = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="own", offload=False)
    assert fixed.turn_reselect == "pivot" and not fixed.anchor_host_copy


def test_a_single_turn_with_own_reselection_gives_the_tokens_of_pivot():
    """Re-selection acts only at a new turn: one generate() (prefill, then one token per step)
    decodes exactly the tokens of turn_reselect="pivot", so the query-aware grid cannot change."""
    model = toy_model()
    ids = _ids(B=2, L=120)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    outs = []
    for kw in (dict(turn_reselect="pivot"), {}):
        cache = HeteroCache(toy_profile(), budget=0.5, **kw, pivot_offload=False)
        outs.append(model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=12,
                                   do_sample=False))
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def _expected_key_picks(keys: torch.Tensor, query: torch.Tensor, n: int, window: int, kernel: int,
                        scaling: float) -> torch.Tensor:
    """Naive oracle of a turn's re-selection: ``keys [N, D]`` a head's real prompt keys, ``query
    [G, q, D]`` its query heads' turn queries; the top ``n`` tokens of the last ``window`` queries'
    attention, summed, average-pooled (zero padding), maxed over the group, ascending."""
    probs = torch.softmax(query[:, -window:].double() @ keys.double().T * scaling, -1).sum(1)  # [G, N]
    pooled = torch.nn.functional.avg_pool1d(probs[:, None], kernel, 1, kernel // 2, count_include_pad=True)[:, 0]
    return pooled.amax(0).topk(n).indices.sort().values


def assert_key_picks(cache, reference, mask, queries, turn_window: int) -> int:
    """Assert that every head a turn re-chose (``_two_turns``, rows of
    ``mask``) holds exactly the oracle's top tokens of its turn queries, keys and values equal to
    the full prompt's (``reference``); returns how many (row, head) were checked."""
    policy, checked = cache.policy, 0
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        K, V = reference.layers[layer_idx].keys, reference.layers[layer_idx].values
        for row in range(mask.shape[0]):
            real = torch.nonzero(mask[row]).flatten()
            for head in np.nonzero(policy.reselected_for(len(real))[layer_idx].numpy())[0]:
                n = int(state.plan[row, head])
                q = queries[layer_idx][row, head * G:(head + 1) * G]
                kernel = policy.kernel_for(len(real))
                picks = _expected_key_picks(K[row, head, real], q, n, turn_window, kernel, D ** -0.5)
                k, v, pos = store.segment(row * store.num_heads + int(head))
                assert torch.equal(pos[:n].long(), real[picks]), (layer_idx, row, head)
                torch.testing.assert_close(k[:n], K[row, head, real[picks]], rtol=0, atol=0)
                torch.testing.assert_close(v[:n], V[row, head, real[picks]], rtol=0, atol=0)
                checked += 1
    return checked


def test_key_scoring_rechooses_the_top_tokens_of_the_turns_attention_over_the_full_prompt_keys():
    model = toy_model()
    reference, mask = _reference_prompt(model)
    cache = HeteroCache(toy_profile(), window=2, **dict(OWN, budget=0.5), pivot_offload=False)
    cache.policy._turn_window = 3  # an internal constant (32), shorter than the turn here
    _, _, queries = _two_turns(model, cache)
    policy = cache.policy
    plain = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="pivot", pivot_offload=False)
    for row in range(2):  # the plan does not depend on turn_reselect
        real = int(mask[row].sum())
        assert torch.equal(policy.plan_for(real), plain.plan_for(real))
    checked = assert_key_picks(cache, reference, mask, queries, turn_window=3)
    assert checked > 0 and cache.stats()["reselected_heads"] == checked


def test_the_whole_turn_scores_when_it_is_shorter_than_the_turn_window():
    model = toy_model()
    reference, mask = _reference_prompt(model)
    cache = HeteroCache(toy_profile(), **dict(OWN, budget=0.5), pivot_offload=False)
    _, _, queries = _two_turns(model, cache)  # a 12-token turn, TURN_WINDOW = 32
    assert assert_key_picks(cache, reference, mask, queries, turn_window=12) > 0


def test_key_scoring_follows_row_changes_and_keeps_single_turn_tokens():
    model = toy_model()
    ids = _ids(B=2, L=120)
    outs = [model.generate(ids, **cache_kwarg(model, HeteroCache(toy_profile(), budget=0.5, **kw, pivot_offload=False)),
                           max_new_tokens=8, do_sample=False, num_beams=2)
            for kw in (dict(turn_reselect="pivot"), {})]
    assert torch.equal(outs[0], outs[1])  # beam search reorders rows; one turn re-chooses nothing

"""HeteroCache's token recovery at a new turn (``turn_reselect="own"``, ``anchor_offload``):
every compressed head with a host copy re-chooses its prompt slots from page summaries of its
full prompt keys with its own turn queries. Tiny random models, the toy profile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache._compat import cache_kwarg
from heterocache.methods.heterocache import HeteroCache, HeteroCachePolicy
from heterocache.profile import Role
from heterocache.profile.testing import toy_profile

TOY_SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
G, D = 2, 16  # toy model: 8 query heads over 4 KV heads, head_dim 16
OWN = dict(budget=0.75, turn_reselect="own", turn_scoring="pages", page_size=4)


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
        turn_mask = torch.cat([mask, torch.ones(B, q_len, dtype=torch.long)], 1)
        model(_ids(B=B, L=q_len, seed=3), attention_mask=turn_mask, **cache_kwarg(model, cache))
    cache.policy.synchronize()
    return ids, mask, queries


def _expected_picks(keys: torch.Tensor, query: torch.Tensor, n: int, page_size: int, T: int) -> torch.Tensor:
    """Naive oracle: prompt indices (of the real tokens) a head holds after re-selection.
    ``keys [N, D]`` its real prompt keys in order, ``query [G, q, D]`` its query heads' turn queries."""
    N = keys.shape[0]
    pages = math.ceil(N / page_size)
    bounds = []
    for p in range(pages):
        page = keys[p * page_size:(p + 1) * page_size].float()
        lo, hi = page.amin(0), page.amax(0)
        best = max(float(torch.maximum(q * lo, q * hi).sum()) for q in query[:, -T:].reshape(-1, keys.shape[1]).float())
        bounds.append(best)
    picks = []
    for p in sorted(range(pages), key=lambda p: (-bounds[p], p)):
        picks.extend(range(p * page_size, min((p + 1) * page_size, N)))
    return torch.tensor(sorted(picks[:n]))


def _reference_prompt(model):
    """``_two_turns``' prompt in a DynamicCache (the full prompt keys and values), and its mask."""
    reference = DynamicCache()
    ids, mask = _ids(B=2), torch.ones(2, 120, dtype=torch.long)
    mask[1, :20] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, reference))
    return reference, mask


def test_reselected_heads_hold_the_top_pages_of_their_own_turn_queries_copied_from_host_in_order():
    model = toy_model()
    reference, mask = _reference_prompt(model)
    cache = HeteroCache(toy_profile(), **OWN)
    _, _, queries = _two_turns(model, cache)
    policy = cache.policy
    roles_seen = set()
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        K, V = reference.layers[layer_idx].keys, reference.layers[layer_idx].values  # [B, H, L, D]
        for row in range(2):
            real = torch.nonzero(mask[row]).flatten()
            marks = policy.summarised_for(len(real))[layer_idx]
            for head in range(store.num_heads):
                if not marks[head]:
                    continue
                roles_seen.add(Role(int(toy_profile().roles[layer_idx, head])).label)
                n = int(state.plan[row, head])
                q = queries[layer_idx][row, head * G:(head + 1) * G]
                picks = _expected_picks(K[row, head, real], q, n, policy.page_size, policy.refresh_interval)
                k, v, pos = store.segment(row * store.num_heads + head)
                assert torch.equal(pos[:n].long(), real[picks]), (layer_idx, row, head)  # in order of position
                torch.testing.assert_close(k[:n], K[row, head, real[picks]], rtol=0, atol=0)
                torch.testing.assert_close(v[:n], V[row, head, real[picks]], rtol=0, atol=0)
                assert torch.equal(pos[n:].long(), torch.arange(120, 132))  # the turn's own tokens untouched
    assert roles_seen == {"anchor", "satellite"}
    assert cache.stats()["reselected_heads"] == sum(
        int(policy.summarised_for(n).sum()) for n in (120, 100))


def test_turn_reselect_own_replaces_the_pivot_refill_of_reselected_satellites_only():
    model = toy_model()
    cache = HeteroCache(toy_profile(), **OWN)
    _two_turns(model, cache, B=1)
    # Layer 0's pivot 0 has satellites 1 and 2, both re-chosen on their own: no pivot refill there;
    # at B=1 every satellite of the toy profile at this budget is re-chosen (layer 2's too).
    marks = cache.policy.summarised_for(120)
    satellites = [(layer, head) for layer, head in toy_profile().heads("satellite")]
    assert all(marks[layer, head] for layer, head in satellites)
    assert cache.stats()["satellite_refills"] == 0 and cache.stats()["refreshes"] > 0


def test_summaries_are_paid_for_inside_the_budget():
    model = toy_model()
    own = HeteroCache(toy_profile(), **OWN)
    pivot = HeteroCache(toy_profile(), budget=OWN["budget"], turn_reselect="pivot")
    with torch.no_grad():
        model(_ids(), **cache_kwarg(model, own))
        model(_ids(), **cache_kwarg(model, pivot))
    pages = math.ceil(120 / OWN["page_size"])
    marks = own.policy.summarised_for(120)
    base = pivot.policy.plan_for(120)
    assert marks.any()
    assert torch.equal(own.policy.plan_for(120), torch.where(marks, base - pages, base))
    assert bool((own.policy.plan_for(120)[marks] >= OWN["page_size"]).all())
    # Stored keys/values + summaries (one page's min and max weigh one token's key and value).
    extra = sum(own.policy.device_extra_bytes_per_layer().values())
    assert extra == int(marks.sum()) * pages * 2 * D * 4
    assert own.memory_report().device_used_bytes + extra == pivot.memory_report().device_used_bytes


def test_summaries_outside_the_budget_keep_the_plan_and_are_reported():
    model = toy_model()
    cache = HeteroCache(toy_profile(), summaries_in_budget=False, **OWN)
    with torch.no_grad():
        model(_ids(), **cache_kwarg(model, cache))
    plain = HeteroCachePolicy(profile=toy_profile(), budget=OWN["budget"], turn_reselect="pivot")
    assert torch.equal(cache.policy.plan_for(120), plain.plan_for(120))
    compressed = torch.isin(toy_profile().roles, torch.tensor([int(Role.ANCHOR), int(Role.SATELLITE)]))
    assert torch.equal(cache.policy.summarised_for(120), compressed & (plain.plan_for(120) < 120))
    extra = sum(cache.policy.device_extra_bytes_per_layer().values())
    assert extra == int(cache.policy.summarised_for(120).sum()) * math.ceil(120 / OWN["page_size"]) * 2 * D * 4
    stores = sum(layer.store.bytes_allocated() for layer in cache.layers)
    assert cache.memory_report().device_bytes == stores + extra  # reported as device bytes beside the store


def test_budget_one_gives_the_tokens_of_dynamic_cache_over_two_turns():
    model = toy_model()
    question = _ids(L=12, seed=3)
    outs = []
    for cache in (DynamicCache(), HeteroCache(toy_profile(), budget=1.0, turn_reselect="own", page_size=4)):
        out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False)
        outs.append(model.generate(torch.cat([out, question], 1), **cache_kwarg(model, cache), max_new_tokens=6,
                                   do_sample=False))
    assert torch.equal(outs[0], outs[1])


# Two turns at budget 0.5 with the defaults of the code before turn_reselect existed (commit e7254ef;
# kernel 5 then, "auto" since).
GOLDEN = [183, 183, 183, 183, 115, 206, 17, 204, 38, 73, 56, 91, 226, 201, 167, 50, 155, 232, 110, 146, 10, 206,
          183, 110, 146, 110]


@pytest.mark.parametrize("params", [dict(turn_reselect="pivot", kernel=5),
                                    dict(turn_reselect="pivot", anchor_offload=True, kernel=5)])
def test_options_off_give_the_previous_default_tokens(params):
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.5, **params)
    out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=6, do_sample=False)
    out = model.generate(torch.cat([out, _ids(L=12, seed=3)], 1), **cache_kwarg(model, cache), max_new_tokens=8,
                         do_sample=False)
    assert out[0, 120:].tolist() == GOLDEN
    assert cache.stats()["reselected_heads"] == 0


@pytest.mark.parametrize("params,copied", [
    (dict(turn_reselect="pivot"), ("satellite",)),
    (dict(turn_reselect="pivot", anchor_offload=True), ("satellite", "anchor")),
    ({}, ("satellite", "anchor")),  # on by default: the default cache is meant for further turns
    (dict(turn_reselect="own", anchor_offload=False), ("satellite",)),
])
def test_host_bytes_include_the_anchors_copies_when_on(params, copied):
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.5, **params, pivot_offload=False)
    with torch.no_grad():
        model(_ids(B=2, L=64), **cache_kwarg(model, cache))
    heads = sum(len(toy_profile().heads(role)) for role in copied)
    assert cache.memory_report().host_bytes == 2 * heads * 64 * D * 4 * 2  # rows x heads x tokens x D x fp32 x KV


@pytest.mark.parametrize("options", [{}, {"turn_scoring": "keys"}, {"summary_memory": "host"}])
def test_reselection_follows_row_changes(options):
    model = toy_model()
    cache = HeteroCache(toy_profile(), **{**OWN, **options})
    ids, mask = _ids(B=2), torch.ones(2, 120, dtype=torch.long)
    mask[1, :20] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.batch_select_indices(torch.tensor([1]))  # keep the padded row only
        model(_ids(L=12, seed=3), attention_mask=torch.ones(1, 132, dtype=torch.long), **cache_kwarg(model, cache))
    policy = cache.policy
    assert cache.stats()["reselected_heads"] == int(policy.summarised_for(100).sum())
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        for head in np.nonzero(state.summarised[0])[0]:
            n = int(state.plan[0, head])
            _, _, pos = store.segment(int(head))
            assert bool((pos[:n] >= 20).all()) and bool((pos[:n].diff() > 0).all())


def test_bad_recovery_parameters_are_rejected():
    with pytest.raises(ValueError, match="turn_reselect"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="mine")
    # Without host copies nothing can be re-chosen: the paper's single-turn behaviour, no anchor copies.
    fixed = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="own", offload=False)
    assert fixed.turn_reselect == "pivot" and not fixed.anchor_offload
    with pytest.raises(ValueError, match="page_size"):
        HeteroCachePolicy(profile=toy_profile(), page_size=0)


def test_summary_drift_rechooses_a_drifted_head_with_the_top_pages_of_its_decode_queries():
    model = toy_model()
    reference = DynamicCache()
    with torch.no_grad():
        model(_ids(), **cache_kwarg(model, reference))
    cache = HeteroCache(toy_profile(), summary_drift=True, refresh_interval=3, **OWN)
    _two_turns(model, cache, B=1)
    policy, g = cache.policy, torch.Generator().manual_seed(5)
    checked = 0
    for layer_idx, state in policy._layers.items():
        if not state.reselect:
            continue
        store = cache.layers[layer_idx].store
        steps = [torch.randn(1, 8, D, generator=g) for _ in range(3)]
        state.summ_queries = list(steps)
        state.summ_reference = torch.zeros_like(state.summ_reference)  # nothing kept: every head drifted
        policy.check_summary_drift(layer_idx, store, defer=False)
        K = reference.layers[layer_idx].keys[0]
        q = torch.stack(steps, 2)[0]  # [Hq, T, D]
        for head in state.reselect:
            n = int(state.plan[0, head])
            picks = _expected_picks(K[head], q[head * G:(head + 1) * G], n, policy.page_size, 3)
            k, _, pos = store.segment(head)
            assert torch.equal(pos[:n].long(), picks)
            torch.testing.assert_close(k[:n], K[head, picks], rtol=0, atol=0)
            checked += 1
    assert checked == int(policy.summarised_for(120).sum())
    assert policy.stats.summary_refreshes == checked


def test_summary_drift_during_generation_is_deferred_and_keeps_heads_equal_to_their_host_copies():
    model = toy_model()
    cache = HeteroCache(toy_profile(), summary_drift=True, refresh_interval=2, drift_threshold=1.0, **OWN)
    out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=4, do_sample=False)
    model.generate(torch.cat([out, _ids(L=12, seed=3)], 1), **cache_kwarg(model, cache), max_new_tokens=9,
                   do_sample=False)
    policy = cache.policy
    policy.flush()
    policy.synchronize()
    stats = policy.stats
    assert stats.summary_checks > 0 and stats.summary_refreshes > 0
    assert stats.satellite_refills == 0  # every satellite is re-chosen on its own at this budget
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        for head in state.reselect:
            n = int(state.plan[0, head])
            k, v, pos = store.segment(head)
            assert bool((pos[:n].diff() > 0).all()) and int(pos[n - 1]) < 120
            k_host, v_host = state.host.gather(0, head, pos[:n].long())
            torch.testing.assert_close(k[:n], k_host, rtol=0, atol=0)
            torch.testing.assert_close(v[:n], v_host, rtol=0, atol=0)


def test_summary_drift_needs_turn_reselect_own():
    with pytest.raises(ValueError, match="summary_drift"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="pivot", turn_scoring="pages", summary_drift=True)


def test_a_budget_that_cannot_pay_for_any_summaries_warns_and_keeps_the_plan():
    policy = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="own", turn_scoring="pages",
                               page_size=4, pivot_offload=False)
    plain = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="pivot", pivot_offload=False)
    with pytest.warns(UserWarning, match="summaries_in_budget=False"):
        plan = policy.plan_for(120)
    assert torch.equal(plan, plain.plan_for(120)) and not bool(policy.summarised_for(120).any())


def test_summary_drift_checks_in_decode_steps_read_no_more_device_values_than_dynamic_cache(monkeypatch):
    from heterocache.bench.diagnostics import count_decode_steps

    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=device")
    model = toy_model()
    dynamic = count_decode_steps(model, _ids(B=2), DynamicCache(), steps=6)
    # A summary drift check and a re-selection decision at every step: the worst case for the host.
    cache = HeteroCache(toy_profile(), summary_drift=True, refresh_interval=1, drift_threshold=1.0, **OWN)
    result = count_decode_steps(model, _ids(B=2), cache, steps=6)
    assert result["host_reads"] <= dynamic["host_reads"] + 1, result["reads_by_kind"]
    cache.policy.flush()
    assert cache.policy.stats.summary_checks > 0 and cache.policy.stats.summary_refreshes > 0


def test_host_summaries_keep_the_device_plan_and_choose_what_device_summaries_choose():
    """summary_memory="host": at a budget that cannot pay for device summaries every compressed
    head is still re-chosen, exactly as with summaries on the device outside the budget; the
    summaries are host bytes, the device holds only the plan's store."""
    model = toy_model()
    kw = dict(OWN, budget=0.5)
    host = HeteroCache(toy_profile(), summary_memory="host", **kw, pivot_offload=False)
    extra = HeteroCache(toy_profile(), summaries_in_budget=False, **kw, pivot_offload=False)
    plain = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="pivot", pivot_offload=False)
    _two_turns(model, host)
    _two_turns(model, extra)
    for n in (120, 100):
        assert torch.equal(host.policy.plan_for(n), plain.plan_for(n))
        assert torch.equal(host.policy.summarised_for(n), extra.policy.summarised_for(n))
    assert host.stats()["reselected_heads"] == extra.stats()["reselected_heads"] > 0
    for a, b in zip(host.layers, extra.layers):
        for seg in range(a.store.num_rows * a.store.num_heads):
            for x, y in zip(a.store.segment(seg), b.store.segment(seg)):
                assert torch.equal(x, y)
    assert host.policy.device_extra_bytes_per_layer() == {}
    summaries = sum(extra.policy.device_extra_bytes_per_layer().values())
    assert summaries > 0
    assert host.memory_report().host_bytes == extra.memory_report().host_bytes + summaries
    assert host.memory_report().device_bytes == sum(layer.store.bytes_allocated() for layer in host.layers)
    assert all(s.summ_min.device.type == "cpu" for s in host.policy._layers.values() if s.summ_min is not None)


def test_bad_summary_memory_is_rejected():
    with pytest.raises(ValueError, match="summary_memory"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="own", summary_memory="gpu")
    with pytest.raises(ValueError, match="summary_memory='device'"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="own", turn_scoring="pages", summary_memory="host",
                          summary_drift=True)


def test_a_single_turn_with_host_summaries_gives_the_default_tokens():
    """Re-selection acts only at a new turn: one generate() (prefill, then one token per step)
    decodes exactly the default HeteroCache's tokens, so the query-aware grid cannot change."""
    model = toy_model()
    ids = _ids(B=2, L=120)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    outs = []
    for kw in (dict(turn_reselect="pivot"), dict(turn_scoring="pages", summary_memory="host", page_size=4), {}):
        cache = HeteroCache(toy_profile(), budget=0.5, **kw, pivot_offload=False)
        outs.append(model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=12,
                                   do_sample=False))
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def _expected_key_picks(keys: torch.Tensor, query: torch.Tensor, n: int, window: int, kernel: int,
                        scaling: float) -> torch.Tensor:
    """Naive oracle of turn_scoring="keys": ``keys [N, D]`` a head's real prompt keys, ``query
    [G, q, D]`` its query heads' turn queries; the top ``n`` tokens of the last ``window`` queries'
    attention, summed, average-pooled (zero padding), maxed over the group, ascending."""
    probs = torch.softmax(query[:, -window:].double() @ keys.double().T * scaling, -1).sum(1)  # [G, N]
    pooled = torch.nn.functional.avg_pool1d(probs[:, None], kernel, 1, kernel // 2, count_include_pad=True)[:, 0]
    return pooled.amax(0).topk(n).indices.sort().values


def assert_key_picks(cache, reference, mask, queries, turn_window: int) -> int:
    """Assert that every head a turn re-chose by ``turn_scoring="keys"`` (``_two_turns``, rows of
    ``mask``) holds exactly the oracle's top tokens of its turn queries, keys and values equal to
    the full prompt's (``reference``); returns how many (row, head) were checked."""
    policy, checked = cache.policy, 0
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        K, V = reference.layers[layer_idx].keys, reference.layers[layer_idx].values
        for row in range(mask.shape[0]):
            real = torch.nonzero(mask[row]).flatten()
            for head in np.nonzero(policy.summarised_for(len(real))[layer_idx].numpy())[0]:
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
    cache = HeteroCache(toy_profile(), window=2, turn_window=3, **dict(OWN, budget=0.5, turn_scoring="keys"),
                        pivot_offload=False)
    _, _, queries = _two_turns(model, cache)
    policy = cache.policy
    plain = HeteroCachePolicy(profile=toy_profile(), budget=0.5, turn_reselect="pivot", pivot_offload=False)
    for row in range(2):  # nothing paid for summaries
        real = int(mask[row].sum())
        assert torch.equal(policy.plan_for(real), plain.plan_for(real))
    checked = assert_key_picks(cache, reference, mask, queries, turn_window=3)
    assert checked > 0 and cache.stats()["reselected_heads"] == checked
    assert policy.device_extra_bytes_per_layer() == {}
    assert all(s.summ_min is None for s in policy._layers.values())


def test_key_scoring_follows_row_changes_and_keeps_single_turn_tokens():
    model = toy_model()
    ids = _ids(B=2, L=120)
    outs = [model.generate(ids, **cache_kwarg(model, HeteroCache(toy_profile(), budget=0.5, **kw, pivot_offload=False)),
                           max_new_tokens=8, do_sample=False, num_beams=2)
            for kw in (dict(turn_reselect="pivot"), {})]
    assert torch.equal(outs[0], outs[1])  # beam search reorders rows; one turn re-chooses nothing


def test_bad_turn_scoring_is_rejected():
    with pytest.raises(ValueError, match="turn_scoring"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="own", turn_scoring="exact")
    with pytest.raises(ValueError, match="turn_window"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="own", turn_scoring="keys", turn_window=0)
    with pytest.raises(ValueError, match="turn_scoring='pages'"):
        HeteroCachePolicy(profile=toy_profile(), turn_reselect="own", turn_scoring="keys", summary_drift=True)

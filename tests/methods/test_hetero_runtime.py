"""HeteroCache runtime on tiny random models with a hand-made profile (every role present)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache import FullKVCache, RaggedCache
from heterocache._compat import cache_kwarg
from heterocache.engine.cache import RaggedLayer
from heterocache.methods.heterocache import HeteroCache, HeteroCachePolicy, InfeasibleBudgetError
from heterocache.profile import HeadProfile, ProfileError, Role
from heterocache.profile.testing import toy_profile

# The toy profile's shape: 3 layers, 8 query heads, 4 KV heads, head_dim 16.
TOY_SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def toy_model(arch="llama"):
    return tiny_model(arch, **TOY_SHAPE)


def _ids(B=1, L=120, seed=0):
    return torch.randint(1, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def test_budget_one_gives_exactly_fullkv_tokens(arch):
    model = toy_model(arch)
    ids = _ids(L=90)
    ref = model.generate(ids, **cache_kwarg(model, FullKVCache()), max_new_tokens=20, do_sample=False)
    cache = HeteroCache(toy_profile(), budget=1.0)
    out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)


def test_stored_tokens_follow_the_plan_and_roles(arch):
    model = toy_model(arch)
    profile = toy_profile()
    cache = HeteroCache(profile, budget=0.5, refresh=False, pivot_offload=False)
    ids, mask = _ids(B=2, L=100), torch.ones(2, 100, dtype=torch.long)
    mask[1, :30] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.end_prompt()
    report = cache.memory_report()
    for row, n in enumerate([100, 70]):
        plan = cache.policy.plan_for(n)
        stored = torch.tensor([layer.stored_tokens[row] for layer in report.layers])
        assert torch.equal(stored, plan)
        full = (profile.roles == Role.VOLATILE) | (profile.roles == Role.PIVOT)
        assert torch.equal(stored[full], torch.full_like(stored[full], n))
        assert int(stored.sum()) == round(0.5 * 12 * n)
    assert report.layers[1].roles == ["volatile", "pivot", "satellite", "anchor"]


def test_only_satellites_are_copied_to_host_memory():
    """With the paper's single-turn behaviour (anchors fixed for good) only satellites keep host
    copies; the default, meant for further turns, copies anchors too (test_hetero_recovery)."""
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.5, turn_reselect="pivot")
    with torch.no_grad():
        model(_ids(B=2, L=64), **cache_kwarg(model, cache))
        cache.end_prompt()
    host = cache.memory_report().host_bytes
    satellites = int((toy_profile().roles == Role.SATELLITE).sum())  # 4 of 12 heads
    assert host == 2 * satellites * 64 * 16 * 4 * 2  # rows x heads x tokens x dim x fp32 x (K, V)
    no_offload = HeteroCache(toy_profile(), budget=0.5, offload=False)
    with torch.no_grad():
        model(_ids(B=2, L=64), **cache_kwarg(model, no_offload))
        no_offload.end_prompt()
    assert no_offload.memory_report().host_bytes == 0


def _prefilled(model, profile, ids, **params):
    cache = HeteroCache(profile, **params)
    with torch.no_grad():
        model(ids, **cache_kwarg(model, cache))
        cache.end_prompt()
    return cache


def test_forced_refresh_refills_satellites_from_host_at_pivot_top_positions():
    model = toy_model()
    cache = _prefilled(model, toy_profile(), _ids(L=80), budget=0.5, refresh_interval=1000, pivot_offload=False)
    with torch.no_grad():  # a few decode steps so satellites hold appended tokens too
        for t in range(3):
            model(_ids(L=1, seed=10 + t), **cache_kwarg(model, cache))
    policy, layer = cache.policy, 0  # layer 0: pivot 0 with satellites 1 and 2
    store = cache.layers[layer].store
    state = policy._layers[layer]
    before = {s: [t.clone() for t in store.segment(s)] for s in range(store.num_segments)}
    refreshed = policy.check_drift(layer, store, scaling=16**-0.5, force=True)
    assert refreshed == [(0, 0)]
    scores = policy.scores_at_refresh(layer, 0, 0)
    for sat in (1, 2):
        n = int(state.plan[0, sat])
        expected = scores.topk(n).indices.sort().values
        k, v, pos = store.segment(sat)
        assert torch.equal(pos[:n].long(), expected)  # prompt positions, in order
        k_host, v_host = state.host.segment(state.host.segment_of(0, sat))
        assert torch.equal(k[:n], k_host[expected]) and torch.equal(v[:n], v_host[expected])
        assert torch.equal(k[n:], before[sat][0][n:])  # decode-appended tokens untouched
        assert torch.equal(pos[n:], before[sat][2][n:])
    for other in (0, 3):  # pivot and anchor untouched
        assert all(torch.equal(a, b) for a, b in zip(store.segment(other), before[other]))
    assert policy.stats.satellite_refills == 2


def _one_layer_setup(query_vec, steps_query, threshold=0.5):
    """One layer: pivot 0, satellite 1, G=1, D=8, prompt of 40 tokens, then decode queries."""
    profile = HeadProfile(
        roles=torch.tensor([[3, 4]]), stability=torch.tensor([[0.3, 0.6]]), budget_ratios=torch.tensor([[0.0, 1.0]]),
        pivots=torch.tensor([[-1, 0]]), model_name="toy/one-layer", num_attention_heads=2, head_dim=8,
    )
    policy = HeteroCachePolicy(profile=profile, budget=0.75, refresh_interval=4, drift_threshold=threshold)
    cache = RaggedCache(policy)
    cache.layers.append(RaggedLayer(0))
    g = torch.Generator().manual_seed(0)
    L, D = 40, 8
    key = torch.randn(1, 2, L, D, generator=g) * 2
    query = query_vec.expand(1, 2, L, D).clone()
    cache.layers[0].seen = L
    cache._fill(cache.layers[0], query, key, key.clone(), torch.ones(1, L, dtype=torch.bool),
                torch.arange(L), 1.0)
    store = cache.layers[0].store
    for _ in range(4):
        policy.on_decode(0, store, steps_query.expand(1, 2, 1, D), 1.0)
    return policy


def test_no_refresh_when_attention_does_not_drift():
    q = torch.randn(8, generator=torch.Generator().manual_seed(1))
    policy = _one_layer_setup(q, q)
    policy.flush()
    assert policy.stats.checks == 1 and sum(policy.stats.refreshes.values()) == 0


def test_refresh_when_attention_drifts():
    q = torch.randn(8, generator=torch.Generator().manual_seed(1))
    policy = _one_layer_setup(q, -q)  # the opposite query attends to the opposite tokens
    assert policy.stats.checks == 1 and sum(policy.stats.refreshes.values()) == 0  # decided, not yet acted on
    policy.flush()
    assert sum(policy.stats.refreshes.values()) == 1 and policy.stats.satellite_refills == 1


def test_generation_with_refresh_every_step_and_padding_runs(arch):
    model = toy_model(arch)
    ids, mask = _ids(B=2, L=70), torch.ones(2, 70, dtype=torch.long)
    mask[0, :9] = 0
    cache = HeteroCache(toy_profile(), budget=0.5, refresh_interval=1, drift_threshold=1.0, pivot_offload=False)
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=12, do_sample=False)
    assert out.shape == (2, 82)
    stats = cache.stats()
    assert stats["drift_checks"] > 0 and stats["refreshes"] > 0 and stats["bytes_moved"] > 0
    assert set(stats["device_bytes_by_role"]) == {"anchor", "volatile", "pivot", "satellite"}


def test_a_new_turn_is_checked_for_drift_before_its_answer_is_decoded():
    model = toy_model()
    ids = _ids(L=80)
    question = _ids(L=12, seed=3)
    checks = {}
    for refresh in (True, False):
        cache = HeteroCache(toy_profile(), budget=0.5, drift_threshold=1.0, refresh=refresh, pivot_offload=False)
        with torch.no_grad():
            model(ids, **cache_kwarg(model, cache))
            cache.end_prompt()
            assert cache.stats()["drift_checks"] == 0
            model(question, **cache_kwarg(model, cache))  # the second turn: several tokens at once
        checks[refresh] = cache.stats()
    pivots = sum(len(toy_profile().clusters(layer)) for layer in range(3))
    assert checks[True]["drift_checks"] == pivots and checks[True]["refreshes"] > 0
    assert checks[False]["drift_checks"] == 0 and checks[False]["refreshes"] == 0


def _turn_events(monkeypatch):
    """(event, layer store) in order while a question turn follows a prefill: the turn's extend
    attentions and the satellite refills."""
    import heterocache.engine.cache as cache_module

    events = []
    attend = cache_module.extend_attention
    monkeypatch.setattr(cache_module, "extend_attention",
                        lambda store, *a, **k: events.append(("attend", id(store))) or attend(store, *a, **k))
    cache = HeteroCache(toy_profile(), budget=0.5, drift_threshold=1.0, pivot_offload=False)
    refill = cache.policy._refill
    cache.policy._refill = lambda layer_idx, store, *a: events.append(("refill", id(store))) or refill(
        layer_idx, store, *a)
    model = toy_model()
    with torch.no_grad():
        model(_ids(L=80), **cache_kwarg(model, cache))
        cache.end_prompt()
        model(_ids(L=12, seed=3), **cache_kwarg(model, cache))
    return events, cache


def test_a_new_turn_refreshes_satellites_before_attending_it(monkeypatch):
    events, cache = _turn_events(monkeypatch)
    refilled = {store for kind, store in events if kind == "refill"}
    assert len([e for e in events if e[0] == "attend"]) == 3 and refilled
    for store in refilled:
        order = [kind for kind, s in events if s == store]
        assert order.index("refill") < order.index("attend"), order


def test_a_new_turn_refreshes_every_pivot_even_without_drift():
    model = toy_model()
    pivots = sum(len(toy_profile().clusters(layer)) for layer in range(3))
    cache = HeteroCache(toy_profile(), budget=0.5, drift_threshold=0.0, pivot_offload=False)
    with torch.no_grad():
        model(_ids(L=80), **cache_kwarg(model, cache))
        cache.end_prompt()
        model(_ids(L=12, seed=3), **cache_kwarg(model, cache))
    assert cache.stats()["refreshes"] == pivots


def test_rows_with_different_padding_are_planned_independently():
    model = toy_model()
    ids = _ids(B=2, L=60)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :20] = 0
    cache = HeteroCache(toy_profile(), budget=0.5, refresh=False)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() derives them from the mask
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache))
        cache.end_prompt()
    single = HeteroCache(toy_profile(), budget=0.5, refresh=False)
    with torch.no_grad():
        model(ids[1:, 20:], **cache_kwarg(model, single))
        single.end_prompt()
    for layer_b, layer_s in zip(cache.layers, single.layers):
        for h in range(4):
            kb, _, pb = layer_b.store.segment(4 + h)  # row 1
            ks, _, ps = layer_s.store.segment(h)
            assert torch.equal(pb - 20, ps)  # same tokens, shifted by the padding
            torch.testing.assert_close(kb, ks, rtol=1e-4, atol=1e-5)


def test_beam_search_at_budget_one_equals_dynamic_cache():
    model = toy_model()
    ids = _ids(B=1, L=40)
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, **cache_kwarg(model, DynamicCache()), num_beams=3, max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("heterocache")
    out = model.generate(ids, **cache_kwarg(model, HeteroCache(toy_profile(), budget=1.0)), num_beams=3,
                         max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)


def test_uniform_switch_gives_equal_compressed_shares():
    model = toy_model()
    cache = _prefilled(model, toy_profile(), _ids(L=100), budget=0.6, inverse_stability=False, refresh=False)
    comp = (toy_profile().roles == Role.ANCHOR) | (toy_profile().roles == Role.SATELLITE)
    stored = torch.stack([layer.store.lengths()[0] for layer in cache.layers])
    assert int(stored[comp].max()) - int(stored[comp].min()) <= 1


def test_absolute_token_budget():
    model = toy_model()
    cache = _prefilled(model, toy_profile(), _ids(L=100), budget_tokens=60, refresh=False)
    stored = torch.stack([layer.store.lengths()[0] for layer in cache.layers])
    assert int(stored.sum()) == 60 * 12


def test_profile_that_does_not_fit_the_model_is_rejected():
    model = tiny_model("llama")  # 3 layers but 2 KV heads, head_dim 16
    with pytest.raises(ProfileError, match="KV heads: profile 4 != model 2"):
        model.generate(_ids(L=20), **cache_kwarg(model, HeteroCache(toy_profile(), budget=0.5)), max_new_tokens=2)


def test_budget_below_the_floor_is_rejected_at_construction():
    # 5 of 12 heads are full: no prompt fits a budget <= 5/12, so the cache refuses it up front.
    with pytest.raises(InfeasibleBudgetError, match=r"must exceed 0\.4167"):
        HeteroCache(toy_profile(), budget=0.2, pivot_offload=False)
    HeteroCache(toy_profile(), budget=0.42, pivot_offload=False)  # just above the floor: accepted


def test_infeasible_budget_for_a_short_prompt_is_rejected_with_the_smallest_feasible_one():
    model = toy_model()
    # Above the floor but a 5-token prompt cannot give each of the 7 compressed heads a token.
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible budget for a 5-token prompt is 0\.5333"):
        _prefilled(model, toy_profile(), _ids(L=5), budget=0.45, pivot_offload=False)


@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget": 1.5}, {"window": 0}, {"kernel": 4},
                                    {"drift_threshold": 1.5}, {"budget_tokens": 0}, {"refresh_interval": 0}])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        HeteroCache(toy_profile(), **kwargs)


def test_unknown_profile_name_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network round trips
    with pytest.raises(Exception, match="profile"):
        HeteroCache("nobody/no-such-model-profile", budget=0.5)


def _assert_satellites_match_host_copies(cache: HeteroCache) -> int:
    """Every satellite's stored prompt tokens equal the host copy at their positions (no torn or
    stale copy); returns how many satellite segments were checked."""
    policy, checked = cache.policy, 0
    policy.synchronize()
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        for (layer, head) in cache.profile.heads("satellite"):
            if layer != layer_idx:
                continue
            for row in range(store.num_rows):
                seg, n = row * store.num_heads + head, int(state.plan[row, head])
                slots = int(store.start[seg]) + torch.arange(n, device=store.device)
                picks = store.pos[slots].cpu().long()  # no padding: pos = index
                k_host, v_host = (t[picks] for t in state.host.segment(state.host.segment_of(row, head)))
                torch.testing.assert_close(store.k[slots].cpu(), k_host, rtol=0, atol=0)
                torch.testing.assert_close(store.v[slots].cpu(), v_host, rtol=0, atol=0)
                checked += 1
    return checked


def test_refresh_on_every_step_leaves_every_satellite_equal_to_its_host_copy():
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.5, refresh_interval=1, drift_threshold=1.0, pivot_offload=False)
    model.generate(_ids(B=2, L=120), **cache_kwarg(model, cache), max_new_tokens=24, do_sample=False)
    assert cache.stats()["refreshes"] > 0
    assert _assert_satellites_match_host_copies(cache) == 2 * len(toy_profile().heads("satellite"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_async_refresh_every_step_stress_leaves_no_corruption():
    model = toy_model().cuda()
    cache = HeteroCache(toy_profile(), budget=0.5, refresh_interval=1, drift_threshold=1.0)
    assert cache.policy._asynchronous
    model.generate(_ids(B=2, L=2000).cuda(), **cache_kwarg(model, cache), max_new_tokens=200, do_sample=False)
    assert cache.stats()["refreshes"] > 100
    assert _assert_satellites_match_host_copies(cache) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_async_refresh_gives_the_tokens_of_the_synchronous_path():
    model = toy_model().cuda()
    ids = _ids(B=2, L=300).cuda()
    outs = []
    for asynchronous in (False, True):
        cache = HeteroCache(toy_profile(), budget=0.5, refresh_interval=1, drift_threshold=1.0)
        cache.policy._asynchronous = asynchronous  # an internal constant, read at the first host copy
        outs.append(model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=64, do_sample=False))
        assert cache.stats()["refreshes"] > 0
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("B", [1, 3])
def test_pivot_keys_read_as_a_view_equal_the_gathered_ones(B):
    model = toy_model()
    cache = _prefilled(model, toy_profile(), _ids(B=B, L=40), budget=0.6)
    policy, viewed = cache.policy, 0
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        idx, valid, spacing = state.pivot_index(store)
        keys, valid2 = state.pivot_keys(store)
        assert torch.equal(valid, valid2) and keys.shape == (*idx.shape, store.k.shape[-1])
        torch.testing.assert_close(keys[valid], store.k[idx][valid], rtol=0, atol=0)
        viewed += spacing is not None
    assert viewed >= 1  # the view path ran (one pivot per row is always evenly spaced)


def test_heterocache_refuses_crop_rather_than_keep_stale_drift_state():
    model = toy_model()
    cache = _prefilled(model, toy_profile(), _ids(L=40), budget=0.6)
    assert not cache.is_croppable


def test_average_pooling_prefers_a_plateau_to_a_lone_peak():
    """A lone peak (0.5 at token 10) against a plateau (0.2 at 40..44): averaged over 3 neighbours
    the plateau wins."""
    from heterocache.policy.base import PrefillContext

    L, D = 60, 16
    weights = torch.full((L,), 1e-4)
    weights[10], weights[40:45] = 0.5, 0.2
    key = torch.zeros(1, 4, L, D)
    key[..., 0] = weights.log()  # query e_0 at scaling 1: attention proportional to the weights
    query = torch.zeros(1, 8, L, D)
    query[..., 0] = 1.0
    ctx = PrefillContext(0, query, key, key.clone(), torch.ones(1, L, dtype=torch.bool), scaling=1.0)
    policy = HeteroCachePolicy(profile=toy_profile(), budget=0.5, kernel=3)
    plan = torch.tensor([[L, 4, 4, 4]])  # three chosen tokens and the protected last one
    mask = policy.select(ctx, plan)
    for head in (1, 2, 3):
        assert torch.nonzero(mask[0, head]).flatten().tolist() == [41, 42, 43, L - 1]


@pytest.mark.parametrize("options, kept", [(dict(), [10, 59]), (dict(window=8), [58, 59])])
def test_window_scores_with_the_last_queries_and_keeps_them(options, kept):
    """The last query attends to token 10, the seven before it to token 30. ``window=1`` scores with
    the last query and keeps 10; ``window=8`` protects the last eight, which use the whole count here."""
    from heterocache.policy.base import PrefillContext

    L, D = 60, 16
    key = torch.zeros(1, 4, L, D)
    key[..., :2] = -10.0
    key[..., 10, 0] = key[..., 30, 1] = 1.0  # query e_0 favours token 10, query e_1 token 30
    query = torch.zeros(1, 8, L, D)
    query[:, :, -8:-1, 1] = query[:, :, -1, 0] = 1.0
    ctx = PrefillContext(0, query, key, key.clone(), torch.ones(1, L, dtype=torch.bool), scaling=1.0)
    policy = HeteroCachePolicy(profile=toy_profile(), budget=0.5, kernel=1, **options)
    mask = policy.select(ctx, torch.tensor([[L, 2, 2, 2]]))
    for head in (1, 2, 3):
        assert torch.nonzero(mask[0, head]).flatten().tolist() == kept


@pytest.mark.parametrize("option", ["score_window", "pooling", "turn_refresh", "drift_topk", "turn_scoring",
                                    "page_size", "summaries_in_budget", "summary_memory", "summary_drift",
                                    "asynchronous", "decision_lag", "turn_window", "anchor_offload"])
def test_removed_options_are_refused(option):
    """Options removed after their ablations (docs/results.md#ablations) are no longer accepted."""
    with pytest.raises(TypeError, match=option):
        HeteroCache(toy_profile(), **{option: None})

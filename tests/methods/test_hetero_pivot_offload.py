"""HeteroCache with ``pivot_offload``: pivots compressed on the device with a host copy, the budget
floor down to the volatile heads' share, every compressed head re-chosen from its own turn queries."""

from __future__ import annotations

import pytest
import torch
from test_hetero_recovery import D, _ids, _reference_prompt, _two_turns, assert_key_picks, toy_model
from transformers import DynamicCache

from heterocache._compat import cache_kwarg
from heterocache.methods.heterocache import HeteroCache, HeteroCachePolicy, InfeasibleBudgetError
from heterocache.profile import Role
from heterocache.profile.clustering import budget_ratios
from heterocache.profile.testing import toy_profile

# toy_profile: 12 KV heads, 2 volatile, 3 pivots, 4 satellites, 3 anchors.
ROLES = toy_profile().roles


def test_the_floor_falls_to_the_volatile_heads_share_and_the_errors_say_so():
    with pytest.raises(InfeasibleBudgetError, match=r"pivot_offload=True: its floor is 0\.1667"):
        HeteroCachePolicy(profile=toy_profile(), budget=0.3, pivot_offload=False)  # floor 5/12 with full pivots
    policy = HeteroCachePolicy(profile=toy_profile(), budget=0.3, pivot_offload=True)
    plan = policy.plan_for(120)
    assert int(plan.sum()) == round(0.3 * 12 * 120)  # exact total
    assert bool((plan[ROLES == Role.VOLATILE] == 120).all()) and bool((plan[ROLES == Role.PIVOT] < 120).all())
    with pytest.raises(InfeasibleBudgetError, match=r"2 of 12 KV heads are kept full \(volatile; pivot_offload"):
        HeteroCachePolicy(profile=toy_profile(), budget=0.15, pivot_offload=True)


@pytest.mark.parametrize("budget, on", [(0.2, True), (0.3, True), (0.5, True), (0.6, False), (1.0, False)])
def test_auto_compresses_the_pivots_where_that_at_least_doubles_the_other_heads_share(budget, on):
    """Toy profile: full heads 5/12 (volatile + pivot), volatile 2/12. A compressed head keeps
    (b - 5/12) / (7/12) of the prompt, or (b - 2/12) / (10/12) with the pivots compressed: at 0.5
    0.143 against 0.4 (2.8x), at 0.6 0.314 against 0.52 (1.65x); under 5/12 only the latter fits."""
    from heterocache.methods.heterocache.plan import PIVOT_OFFLOAD_GAIN, compressed_share

    policy = HeteroCachePolicy(profile=toy_profile(), budget=budget)
    assert policy.pivot_offload is on
    full, volatile = (ROLES == Role.VOLATILE) | (ROLES == Role.PIVOT), ROLES == Role.VOLATILE
    without = compressed_share(full, budget)
    assert on == (without == 0.0 or compressed_share(volatile, budget) >= PIVOT_OFFLOAD_GAIN * without)
    explicit = HeteroCachePolicy(profile=toy_profile(), budget=budget, pivot_offload=on)
    assert torch.equal(policy.plan_for(120), explicit.plan_for(120)) and torch.equal(policy.full, explicit.full)


@pytest.mark.parametrize("options", [dict(turn_reselect="pivot"), dict(offload=False), dict(budget_tokens=60)])
def test_auto_keeps_the_pivots_full_where_the_options_or_the_budget_spec_rule_it_out(options):
    assert HeteroCachePolicy(profile=toy_profile(), budget=0.5, **options).pivot_offload is False


def test_compressing_no_pivots_never_pays():
    from heterocache.methods.heterocache.plan import pivot_offload_pays

    volatile = ROLES == Role.VOLATILE  # a profile without pivots has nothing to compress
    assert not pivot_offload_pays(volatile, torch.zeros_like(volatile), 0.2)
    assert pivot_offload_pays(volatile, ROLES == Role.PIVOT, 0.2)


def test_pivot_offload_rejects_a_mode_it_does_not_know():
    with pytest.raises(ValueError, match="pivot_offload must be True, False or 'auto'"):
        HeteroCachePolicy(profile=toy_profile(), budget=0.5, pivot_offload="yes")


def test_shares_are_the_inverse_stability_ratios_over_every_compressed_head():
    profile = toy_profile()
    policy = HeteroCachePolicy(profile=profile, budget=0.5, pivot_offload=True)
    roles = profile.roles.clone()
    roles[roles == Role.PIVOT] = int(Role.ANCHOR)
    expected = budget_ratios(roles, profile.stability)
    compressed = roles != Role.VOLATILE
    torch.testing.assert_close(policy.ratios[compressed], expected[compressed])
    # Less stable heads keep more tokens, pivots included.
    plan = policy.plan_for(120)
    stab, kept = profile.stability[compressed], plan[compressed].double()
    order = torch.argsort(stab)
    assert bool((kept[order].diff() <= 1).all())  # monotone up to the rounding token


def test_pivot_offload_needs_own_reselection_and_host_copies():
    with pytest.raises(ValueError, match="pivot_offload"):
        HeteroCachePolicy(profile=toy_profile(), budget=0.5, pivot_offload=True, turn_reselect="pivot")
    with pytest.raises(ValueError, match="pivot_offload"):
        HeteroCachePolicy(profile=toy_profile(), budget=0.5, pivot_offload=True, offload=False)
    # Without host copies the hint does not suggest pivot_offload.
    with pytest.raises(InfeasibleBudgetError) as err:
        HeteroCachePolicy(profile=toy_profile(), budget=0.3, offload=False)
    assert "pivot_offload" not in str(err.value)


def test_a_profile_without_stability_gives_pivots_the_mean_share():
    profile = toy_profile()
    ratios = profile.budget_ratios.clone()
    ratios[profile.roles == Role.SATELLITE] *= 2.0  # an allocation not centred on 1
    converted = toy_profile(has_stability=False, budget_ratios=ratios)
    policy = HeteroCachePolicy(profile=converted, budget=0.5, pivot_offload=True)
    compressed = (ROLES == Role.ANCHOR) | (ROLES == Role.SATELLITE)
    mean = converted.budget_ratios[compressed].mean()
    torch.testing.assert_close(policy.ratios[ROLES == Role.PIVOT], mean.expand(3))
    torch.testing.assert_close(policy.ratios[compressed], converted.budget_ratios[compressed])


def test_every_compressed_head_keeps_a_host_copy_and_is_rechosen_from_its_own_turn_queries():
    model = toy_model()
    reference, mask = _reference_prompt(model)
    cache = HeteroCache(toy_profile(), budget=0.4, pivot_offload=True, window=2)
    cache.policy._turn_window = 3  # an internal constant (32), shorter than the turn here
    _, _, queries = _two_turns(model, cache)
    compressed = int((ROLES != Role.VOLATILE).sum())
    # Host bytes: the full prompt of every compressed head (rows x heads x tokens x D x fp32 x KV).
    assert cache.memory_report().host_bytes == 2 * compressed * 120 * D * 4 * 2
    stats = cache.stats()
    assert stats["refreshes"] == 0 and stats["satellite_refills"] == 0  # no cluster refresh
    checked = assert_key_picks(cache, reference, mask, queries, turn_window=3)
    assert checked == 2 * compressed == stats["reselected_heads"]  # pivots re-chosen too


def test_budget_one_gives_the_tokens_of_dynamic_cache_over_two_turns():
    model = toy_model()
    question = _ids(L=12, seed=3)
    outs = []
    for cache in (DynamicCache(), HeteroCache(toy_profile(), budget=1.0, pivot_offload=True)):
        out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False)
        outs.append(model.generate(torch.cat([out, question], 1), **cache_kwarg(model, cache), max_new_tokens=6,
                                   do_sample=False))
    assert torch.equal(outs[0], outs[1])
    assert cache.stats()["reselected_heads"] == 0 and cache.memory_report().host_bytes > 0  # copies kept, none used


def test_generation_over_two_turns_keeps_every_rechosen_head_equal_to_its_host_copy():
    model = toy_model()
    cache = HeteroCache(toy_profile(), budget=0.4, pivot_offload=True, refresh_interval=2, drift_threshold=1.0)
    out = model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=4, do_sample=False)
    model.generate(torch.cat([out, _ids(L=12, seed=3)], 1), **cache_kwarg(model, cache), max_new_tokens=9,
                   do_sample=False)
    policy = cache.policy
    policy.flush()
    policy.synchronize()
    assert policy.stats.reselected_heads > 0
    pivots = 0
    for layer_idx, state in policy._layers.items():
        store = cache.layers[layer_idx].store
        roles = ROLES[policy.model_layers[layer_idx]]
        for head in state.turn.heads:
            pivots += int(roles[head]) == int(Role.PIVOT)
            n = int(state.plan[0, head])
            k, v, pos = store.segment(head)
            assert bool((pos[:n].diff() > 0).all()) and int(pos[n - 1]) < 120
            k_host, v_host = (t[pos[:n].long()] for t in state.host.segment(state.host.segment_of(0, head)))
            torch.testing.assert_close(k[:n], k_host, rtol=0, atol=0)
            torch.testing.assert_close(v[:n], v_host, rtol=0, atol=0)
    assert pivots == int((ROLES == Role.PIVOT).sum())

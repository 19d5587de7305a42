"""Agreement of two profiles: roles, compressed-vs-full, stability correlations."""

import pytest
import torch

from heterocache.profile import ProfileError
from heterocache.profile.compare import compare_profiles, format_comparison, pearson, rankdata, spearman
from heterocache.profile.testing import toy_profile


def test_a_profile_agrees_with_itself():
    c = compare_profiles(toy_profile(), toy_profile())
    assert (c.role_agreement, c.role_kappa, c.compressed_agreement) == (1.0, 1.0, 1.0)
    assert c.stability_pearson == pytest.approx(1.0) and c.stability_spearman == pytest.approx(1.0)
    assert c.stability_mean_abs_diff == 0.0


def test_one_satellite_turned_anchor_changes_roles_but_not_compression():
    roles, pivots = toy_profile().roles.clone(), toy_profile().pivots.clone()
    roles[0, 2], pivots[0, 2] = 1, -1  # layer 0: P S0 S0 A -> P S0 A A
    other = toy_profile(roles=roles, pivots=pivots, stability=toy_profile().stability.clone().fill_(0.6))
    c = compare_profiles(toy_profile(), other)
    assert c.heads == 12
    assert c.role_agreement == pytest.approx(11 / 12)
    assert c.compressed_agreement == 1.0
    assert c.confusion["satellite"]["anchor"] == 1 and c.confusion["anchor"]["anchor"] == 3


def test_compressed_vs_full_counts_heads_that_switch_side():
    roles, pivots = toy_profile().roles.clone(), toy_profile().pivots.clone()
    roles[1, 3] = 2  # anchor -> volatile
    c = compare_profiles(toy_profile(), toy_profile(roles=roles, pivots=pivots))
    assert c.compressed_agreement == pytest.approx(11 / 12)


def test_stability_correlations_are_none_without_scores():
    c = compare_profiles(toy_profile(), toy_profile(has_stability=False))
    assert c.stability_pearson is None and c.stability_spearman is None
    assert "n/a" in format_comparison(c)


def test_profiles_of_different_shapes_cannot_be_compared():
    small = toy_profile(roles=[[3, 4]], stability=[[0.5, 0.5]], budget_ratios=[[0, 1]], pivots=[[-1, 0]],
                        num_attention_heads=2)
    with pytest.raises(ProfileError, match="shapes"):
        compare_profiles(toy_profile(), small)


def test_rankdata_averages_ties():
    assert rankdata(torch.tensor([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]


def test_spearman_is_pearson_of_ranks():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([1.0, 4.0, 9.0, 16.0, 100.0])  # monotone, not linear
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.95
    assert spearman(x, -y) == pytest.approx(-1.0)


def test_known_spearman_with_ties():
    # ranks x: 1,2,3,4; ranks y: 1.5,1.5,3,4 -> Pearson of the ranks
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 5.0, 6.0, 7.0])
    rx, ry = torch.tensor([1, 2, 3, 4.0]), torch.tensor([1.5, 1.5, 3, 4])
    expected = float(((rx - rx.mean()) * (ry - ry.mean())).sum() / ((rx - rx.mean()).norm() * (ry - ry.mean()).norm()))
    assert spearman(x, y) == pytest.approx(expected)


def test_correlation_of_a_constant_is_none():
    assert pearson(torch.ones(4), torch.arange(4.0)) is None

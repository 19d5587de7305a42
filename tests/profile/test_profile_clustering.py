"""Greedy star clustering, the anchor/volatile split and budget ratios, on hand-made inputs."""

import pytest
import torch

from heterocache.profile.clustering import STABILITY_EPS, assign_roles, budget_ratios, neighbours, star_clusters
from heterocache.profile.roles import Role


def graph(n, edges):
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        adjacency[i, j] = adjacency[j, i] = True
    return adjacency


def test_full_clique_is_one_star_with_the_lowest_index_as_pivot():
    assert star_clusters(graph(4, [(i, j) for i in range(4) for j in range(i + 1, 4)])) == {0: [1, 2, 3]}


def test_isolated_heads_form_no_cluster():
    assert star_clusters(graph(5, [])) == {}


def test_highest_degree_head_becomes_the_first_pivot():
    # star around 2 plus an edge 0-1: head 2 has 3 neighbours
    assert list(star_clusters(graph(5, [(2, 0), (2, 3), (2, 4), (0, 1)])))[0] == 2


def test_degree_ties_go_to_the_lowest_index():
    # two disjoint edges: heads 0,1,2,3 all have degree 1
    assert star_clusters(graph(4, [(0, 1), (2, 3)])) == {0: [1], 2: [3]}


def test_path_leaves_an_end_without_unassigned_neighbours():
    # 0-1-2-3: pivot 1 takes {0, 2}; 3's only neighbour is taken, so 3 stays unique
    assert star_clusters(graph(4, [(0, 1), (1, 2), (2, 3)])) == {1: [0, 2]}


def test_degree_counts_only_unassigned_neighbours():
    # 0 has 3 neighbours (1,2,3); then 4 and 5 both touch 3 (taken) and each other
    clusters = star_clusters(graph(6, [(0, 1), (0, 2), (0, 3), (3, 4), (4, 5)]))
    assert clusters == {0: [1, 2, 3], 4: [5]}


def test_self_loops_are_ignored():
    adjacency = torch.eye(3, dtype=torch.bool)
    assert star_clusters(adjacency) == {}


def test_neighbours_threshold_is_inclusive_and_drops_the_diagonal():
    similarity = torch.tensor([[1.0, 0.5, 0.49], [0.5, 1.0, 0.2], [0.49, 0.2, 1.0]])
    assert torch.equal(neighbours(similarity, 0.5), graph(3, [(0, 1)]))


def test_unique_heads_split_by_stability_threshold_inclusive():
    similarity = torch.eye(3)[None]  # no neighbours
    roles, pivots = assign_roles(similarity, torch.tensor([[0.5, 0.49, 0.9]]), tau_sim=0.5, tau_stable=0.5)
    assert roles.tolist() == [[Role.ANCHOR, Role.VOLATILE, Role.ANCHOR]]
    assert pivots.tolist() == [[-1, -1, -1]]


def test_assign_roles_marks_pivots_and_satellites_per_layer():
    similarity = torch.stack([
        torch.tensor([[1, .9, .1], [.9, 1, .1], [.1, .1, 1]]),
        torch.tensor([[1, .1, .1], [.1, 1, .7], [.1, .7, 1]]),
    ]).float()
    stability = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.1, 0.1]])
    roles, pivots = assign_roles(similarity, stability, tau_sim=0.5, tau_stable=0.5)
    assert roles.tolist() == [[Role.PIVOT, Role.SATELLITE, Role.VOLATILE], [Role.ANCHOR, Role.PIVOT, Role.SATELLITE]]
    assert pivots.tolist() == [[-1, 0, -1], [-1, -1, 1]]


def test_budget_ratios_are_inverse_stability_with_mean_one_over_compressed_heads():
    roles = torch.tensor([[Role.ANCHOR, Role.SATELLITE, Role.PIVOT, Role.VOLATILE]])
    stability = torch.tensor([[0.8, 0.4, 0.3, 0.1]])
    ratios = budget_ratios(roles, stability)
    w = torch.tensor([1 / (0.8 + STABILITY_EPS), 1 / (0.4 + STABILITY_EPS)])
    assert torch.allclose(ratios[0, :2], 2 * w / w.sum())
    assert ratios[0, :2].mean() == pytest.approx(1.0)
    assert torch.isnan(ratios[0, 2:]).all()


def test_budget_ratio_of_a_never_stable_head_is_finite():
    roles = torch.tensor([[Role.ANCHOR, Role.SATELLITE]])
    ratios = budget_ratios(roles, torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(ratios).all() and ratios.mean() == pytest.approx(1.0)


def test_budget_ratios_without_compressed_heads_are_all_nan():
    assert torch.isnan(budget_ratios(torch.tensor([[Role.VOLATILE]]), torch.tensor([[0.2]]))).all()

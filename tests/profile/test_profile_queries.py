"""What a HeadProfile answers about its heads (toy profile: P S0 S0 A / V P S1 A / S3 V A P)."""

import pytest
import torch

from heterocache.profile import Role
from heterocache.profile.testing import toy_profile


def test_shape_properties():
    p = toy_profile()
    assert (p.num_layers, p.num_kv_heads, p.num_heads, p.num_attention_heads, p.head_dim) == (3, 4, 12, 8, 16)


def test_counts_per_role_cover_every_role_in_order():
    assert toy_profile().counts() == {"anchor": 3, "volatile": 2, "pivot": 3, "satellite": 4}


def test_layer_counts():
    assert toy_profile().layer_counts(1) == {"anchor": 1, "volatile": 1, "pivot": 1, "satellite": 1}


def test_heads_of_a_role_accepts_enum_name_and_code():
    expected = [(0, 0), (1, 1), (2, 3)]
    p = toy_profile()
    assert p.heads(Role.PIVOT) == p.heads("pivot") == p.heads(3) == expected


def test_heads_accepts_the_reference_codes_older_names():
    assert toy_profile().heads("Similar_Member") == toy_profile().heads("satellite")


def test_role_and_pivot_of_a_head():
    p = toy_profile()
    assert p.role_of(2, 0) is Role.SATELLITE and p.pivot_of(2, 0) == 3
    assert p.role_of(0, 3) is Role.ANCHOR and p.pivot_of(0, 3) is None


def test_satellites_of_a_pivot():
    assert toy_profile().satellites_of(0, 0) == [1, 2]


def test_satellites_of_a_head_that_is_not_a_pivot_raises():
    with pytest.raises(ValueError, match="is an anchor, not a pivot"):
        toy_profile().satellites_of(0, 3)


def test_clusters_and_cluster_sizes():
    p = toy_profile()
    assert p.clusters(2) == {3: [0]}
    assert sorted(p.cluster_sizes()) == [2, 2, 3]


def test_compressed_mask_is_anchor_or_satellite():
    expected = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(toy_profile().compressed_mask(), expected)


def test_repr_is_short_and_names_the_counts():
    text = repr(toy_profile())
    assert "toy/toy-model" in text and "satellite=4" in text and "tensor" not in text


def test_role_codes_match_the_published_type_map():
    assert {r.label: int(r) for r in Role} == {"anchor": 1, "volatile": 2, "pivot": 3, "satellite": 4}
    assert [r.compressed for r in Role] == [True, False, False, True]

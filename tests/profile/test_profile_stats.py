"""Top-k sets, overlaps, stability and similarity on synthetic attention with known answers."""

import math

import pytest
import torch

from heterocache.profile.stats import median_over_steps, membership, overlap, pairwise_overlap
from heterocache.profile.topk import effective_topk, newest_query_attention, pooled_topk


def as_set(indices):
    return set(indices.tolist())


def test_pooled_topk_finds_planted_peaks():
    scores = torch.zeros(40)
    for p in (5, 20, 33):  # triangular bumps: after pooling each bump peaks at its centre
        scores[p - 2:p + 3] = torch.tensor([0.25, 0.5, 1.0, 0.5, 0.25])
    assert as_set(pooled_topk(scores, 3)) == {5, 20, 33}


def test_pooling_prefers_a_dense_neighbourhood_over_a_lone_spike():
    scores = torch.zeros(30)
    scores[3] = 1.0                   # lone spike: pooled value 0.2 around it
    scores[13:18] = 0.5               # block: pooled value at its centre 15 is 0.5
    assert as_set(pooled_topk(scores, 1)) == {15}
    assert as_set(pooled_topk(scores, 1, kernel=1)) == {3}


def test_pooled_topk_keeps_leading_dimensions():
    assert pooled_topk(torch.rand(2, 3, 50), 7).shape == (2, 3, 7)


def test_pooled_topk_rejects_k_larger_than_the_prompt():
    with pytest.raises(ValueError, match=r"top-k size 11 must be in \[1, 10\]"):
        pooled_topk(torch.rand(10), 11)


def test_effective_topk_is_capped_by_a_fraction_of_the_prompt():
    assert effective_topk(5000, 1024) == 1024          # paper settings unaffected
    assert effective_topk(2048, 1024) == 512           # 0.25 of the prompt
    assert effective_topk(2048, 1024, max_fraction=1.0) == 1024
    assert effective_topk(3, 1024) == 1                # never 0


def test_overlap_is_intersection_over_k():
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    b = torch.tensor([[3, 2, 9, 8], [4, 5, 6, 7]])
    assert overlap(a, b, 10).tolist() == [0.5, 1.0]


def test_membership_marks_listed_positions():
    assert membership(torch.tensor([1, 3]), 5).tolist() == [False, True, False, True, False]


def test_pairwise_overlap_of_known_sets():
    sets = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5], [6, 7, 8, 9]])
    expected = torch.tensor([[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])
    assert torch.equal(pairwise_overlap(sets, 10), expected)


def test_stability_is_the_median_over_steps_numpy_style():
    steps = torch.tensor([[0.1], [0.9], [0.3], [0.5]])  # even count: mean of 0.3 and 0.5
    assert median_over_steps(steps).item() == pytest.approx(0.4)
    assert median_over_steps(steps[:3]).item() == pytest.approx(0.3)


def planted_query_key(peaks_per_head, length=32, dim=8, strength=12.0):
    """Keys are one-hot-ish; each query head points at given key positions."""
    torch.manual_seed(0)
    key = torch.randn(1, 1, length, dim) * 0.01
    key[0, 0, :, 0] = 0.0
    q_heads = len(peaks_per_head)
    query = torch.zeros(1, q_heads, 1, dim)
    for h, peaks in enumerate(peaks_per_head):
        query[0, h, 0, 0] = strength
        for p in peaks:
            key[0, 0, p, 0] = 1.0
    return query, key


def test_newest_query_attention_averages_the_gqa_group():
    # two query heads share one KV head; head 0 looks at position 3, head 1 at position 3 too
    query, key = planted_query_key([[3], [3]])
    probs = newest_query_attention(query, key, None, scaling=1.0, prefill_len=32)
    assert probs.shape == (1, 1, 32)
    assert probs[0, 0].argmax().item() == 3


def test_newest_query_attention_matches_softmax_of_the_last_row():
    torch.manual_seed(1)
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 20, 8)
    probs = newest_query_attention(query, key, None, scaling=None, prefill_len=15)
    full = torch.softmax(query[:, :, -1:] @ key.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8), -1)
    expected = full[:, :, 0, :15].reshape(1, 2, 2, 15).mean(2)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_masked_positions_get_no_attention():
    torch.manual_seed(2)
    query, key = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 10, 8)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    mask[..., :4] = False  # left padding
    probs = newest_query_attention(query, key, mask, scaling=None, prefill_len=10)
    assert torch.all(probs[..., :4] == 0)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_additive_float_masks_are_applied():
    torch.manual_seed(3)
    query, key = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 10, 8)
    mask = torch.zeros(1, 1, 1, 10)
    mask[..., 7:] = float("-inf")
    probs = newest_query_attention(query, key, mask, scaling=None, prefill_len=10)
    assert torch.all(probs[..., 7:] == 0)


def test_probabilities_are_normalised_over_all_keys_then_cut_to_the_prompt():
    # decode step: 10 prompt keys + 2 generated; the generated keys take probability mass
    query, key = planted_query_key([[11]], length=12)
    probs = newest_query_attention(query, key, None, scaling=1.0, prefill_len=10)
    assert probs.shape[-1] == 10 and probs.sum().item() < 0.5

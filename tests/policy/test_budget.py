"""Budget semantics: fractions, absolute token counts, sum-preserving rounding, capped splits."""

from __future__ import annotations

import pytest
import torch

from heterocache.methods.snapkv import SnapKVPolicy
from heterocache.policy.budget import (
    allocate_proportional,
    check_budget,
    check_budget_spec,
    check_budget_tokens,
    round_preserving_sum,
    tokens_for_budget,
)


def test_fraction_keeps_rounded_share_of_each_rows_prompt():
    n = torch.tensor([100, 10, 3, 1])
    assert tokens_for_budget(0.25, n).tolist() == [25, 3, 1, 1]  # 2.5 rounds up; at least 1
    assert tokens_for_budget(1.0, n).tolist() == [100, 10, 3, 1]


def test_budget_tokens_keeps_an_absolute_count_capped_by_the_prompt():
    n = torch.tensor([100, 10, 3])
    assert tokens_for_budget(0.9, n, budget_tokens=20).tolist() == [20, 10, 3]  # overrides the fraction
    assert tokens_for_budget(None, n, budget_tokens=5).tolist() == [5, 5, 3]


@pytest.mark.parametrize("value", [0, -3])
def test_budget_tokens_below_one_is_rejected(value):
    with pytest.raises(ValueError, match="budget_tokens must be >= 1"):
        check_budget_tokens(value)


@pytest.mark.parametrize("value", [2.5, "8", True])
def test_budget_tokens_of_wrong_type_is_rejected(value):
    with pytest.raises(TypeError, match="budget_tokens must be an integer"):
        check_budget_tokens(value)


def test_integer_budget_above_one_points_to_budget_tokens():
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\].*budget_tokens=512"):
        check_budget(512)
    assert check_budget(1) == 1.0  # an integer 1 stays "the whole prompt"


def test_budget_spec_needs_one_of_the_two():
    assert check_budget_spec(0.5) == (0.5, None)
    assert check_budget_spec(None, 64) == (None, 64)
    with pytest.raises(TypeError, match="budget_tokens"):
        check_budget_spec(None, None)


def test_snapkv_plan_uses_budget_tokens():
    from heterocache.policy.base import PrefillContext

    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :30] = False
    ctx = PrefillContext(0, torch.zeros(2, 4, 50, 8), torch.zeros(2, 2, 50, 8), torch.zeros(2, 2, 50, 8), valid, 1.0)
    assert SnapKVPolicy(budget_tokens=24).plan(ctx).tolist() == [[24, 24], [20, 20]]
    assert SnapKVPolicy(budget=0.5).plan(ctx).tolist() == [[25, 25], [10, 10]]


def test_round_preserving_sum_hands_remainders_to_largest_fractions():
    values = torch.tensor([[1.5, 2.5, 3.0], [0.2, 0.3, 0.5], [3.3, 3.3, 3.4]], dtype=torch.float64)
    out = round_preserving_sum(values)
    assert out.tolist() == [[2, 2, 3], [0, 0, 1], [3, 3, 4]]  # ties go to the lower index
    assert torch.equal(out.sum(-1), values.sum(-1).round().long())


def test_round_preserving_sum_respects_caps():
    out = round_preserving_sum(torch.tensor([[4.0, 2.6, 2.4]], dtype=torch.float64), torch.tensor([[4, 5, 5]]))
    assert out.tolist() == [[4, 3, 2]]


def test_allocate_proportional_without_caps_is_proportional():
    out = allocate_proportional(torch.tensor([60.0]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([100.0]))
    assert torch.allclose(out, torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64))


def test_allocate_proportional_redistributes_what_a_capped_entry_cannot_take():
    # 90 split 1:1:8 would give 9, 9, 72; the cap of 40 leaves 50 for the others, split 1:1.
    out = allocate_proportional(torch.tensor([90.0]), torch.tensor([[1.0, 1.0, 8.0]]), torch.tensor([40.0]))
    assert torch.allclose(out, torch.tensor([[25.0, 25.0, 40.0]], dtype=torch.float64))
    # Cascading caps: 100 split 1:2:7 with caps 20 -> every entry capped, 60 spent.
    out = allocate_proportional(torch.tensor([100.0]), torch.tensor([[1.0, 2.0, 7.0]]), torch.tensor([20.0]))
    assert torch.allclose(out, torch.full((1, 3), 20.0, dtype=torch.float64))


def test_allocate_proportional_rows_are_independent_and_zero_weights_split_equally():
    out = allocate_proportional(
        torch.tensor([12.0, 12.0]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 4.0]]), torch.tensor([100.0, 5.0])
    )
    assert torch.allclose(out, torch.tensor([[4.0, 4.0, 4.0], [3.5, 3.5, 5.0]], dtype=torch.float64))

"""HeteroCache budget arithmetic."""

from __future__ import annotations

import pytest
import torch

from heterocache.methods.heterocache import InfeasibleBudgetError, min_feasible_budget, plan_tokens

FULL = torch.tensor([[True, False, False], [False, False, True]])
RATIOS = torch.tensor([[0.0, 0.5, 3.0], [0.25, 0.25, 0.0]])


def test_full_heads_keep_everything_and_shares_follow_ratios():
    plan = plan_tokens(FULL, RATIOS, budget=0.4, prompt_tokens=100)
    # Compressed heads share 0.4*6*100 - 2*100 = 40 tokens in ratio 0.5 : 3 : 0.25 : 0.25.
    assert plan.tolist() == [[100, 5, 30], [3, 2, 100]]


def test_paper_base_formula_when_nothing_clamps():
    full = torch.tensor([[True, False, False, False]])
    ratios = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    b, L, H, F = 0.5, 1000, 4, 1
    base = (b * H - F) * L / (H - F)
    shares = plan_tokens(full, ratios, b, L)[0, 1:]
    assert all(abs(n - base) < 1 for n in shares.tolist())  # 333.33 each...
    assert int(shares.sum()) == round(b * H * L) - F * L  # ...and exactly 1000 in all


@pytest.mark.parametrize("budget", [0.35, 0.41, 0.5, 0.77, 0.93, 1.0])
@pytest.mark.parametrize("prompt", [1, 2, 7, 100, 4093])
def test_total_is_exact_and_each_head_within_bounds(budget, prompt):
    try:
        plan = plan_tokens(FULL, RATIOS, budget, prompt)
    except InfeasibleBudgetError:
        assert budget < min_feasible_budget(FULL, prompt)
        return
    assert int(plan.sum()) == round(budget * 6 * prompt)
    assert int(plan.min()) >= 1 and int(plan.max()) <= prompt
    assert torch.equal(plan[FULL], torch.full((2,), prompt))


def test_heads_with_ratio_above_one_over_budget_clamp_and_give_the_rest_away():
    # Ratio 3 at budget 0.6: 3 * base > L, so head (0, 2) keeps the whole prompt and the
    # tokens it cannot use go to the others, keeping the total exact.
    plan = plan_tokens(FULL, RATIOS, budget=0.6, prompt_tokens=100)
    assert plan[0, 2] == 100
    assert int(plan.sum()) == 360
    assert plan[0, 1] > plan[1, 0]  # larger ratio, larger share


def test_budget_one_keeps_every_token():
    assert torch.equal(plan_tokens(FULL, RATIOS, 1.0, 57), torch.full((2, 3), 57))


def test_infeasible_budget_names_the_smallest_feasible_one():
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible budget for a 100-token prompt is 0\.3400"):
        plan_tokens(FULL, RATIOS, 0.3, 100)
    assert plan_tokens(FULL, RATIOS, 0.34, 100).min() == 1


def test_uniform_ratios_give_equal_shares():
    plan = plan_tokens(FULL, torch.ones(2, 3), budget=0.5, prompt_tokens=100)
    assert sorted(plan[~FULL].tolist()) == [25, 25, 25, 25]

"""kernel="auto": the selection's pooling kernel from the tokens a compressed head keeps, per row."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from heterocache._compat import cache_kwarg
from heterocache.methods.heterocache import HeteroCache, HeteroCachePolicy
from heterocache.methods.heterocache.plan import AUTO_KERNEL_RANGE, AUTO_KERNEL_UNCOMPRESSED, auto_kernel
from heterocache.policy.scoring import pool_scores, row_taps
from heterocache.profile.testing import toy_profile

TOY_SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)


@pytest.mark.parametrize("slots,kernel", [(89, 5), (954, 15), (326, 15), (200, 11), (40, 3), (10, 3)])
def test_auto_kernel_grows_with_the_compressed_heads_slots(slots, kernel):
    plan = torch.tensor([[4096, slots, slots], [slots, slots, 4096]])  # full heads do not count
    assert auto_kernel(plan, 4096) == kernel


def test_auto_kernel_without_compressed_heads_and_its_range():
    assert auto_kernel(torch.full((2, 3), 100), 100) == AUTO_KERNEL_UNCOMPRESSED
    lo, hi = AUTO_KERNEL_RANGE
    assert lo % 2 == 1 and hi % 2 == 1


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_row_taps_pool_each_row_as_its_own_kernel(mode):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 2, 50)
    x[1, :, :, 40:] = float("-inf")  # masked slots must not leak into a row's neighbours
    kernels = [5, 15, 3, 5]
    out = pool_scores(x, row_taps(kernels, x.device), mode)
    for row, kernel in enumerate(kernels):
        assert torch.equal(out[row : row + 1], pool_scores(x[row : row + 1], kernel, mode))
    assert row_taps([7, 7], x.device) == 7  # rows that agree take the plain path


def test_auto_resolves_per_prompt_length_and_rejects_other_strings():
    policy = HeteroCachePolicy(profile=toy_profile(), budget=0.5)
    assert policy.kernel == "auto"
    policy._set_compressible(list(range(toy_profile().num_layers)))
    short, long = policy.kernel_for(40), policy.kernel_for(600)
    assert short == auto_kernel(policy.plan_for(40), 40) and long == auto_kernel(policy.plan_for(600), 600)
    assert short < long
    assert HeteroCachePolicy(profile=toy_profile(), budget=0.5, kernel=9).kernel_for(600) == 9
    with pytest.raises(ValueError, match="kernel"):
        HeteroCachePolicy(profile=toy_profile(), budget=0.5, kernel="wide")


def _positions(cache, row: int) -> list[list[int]]:
    return [layer.store.segment(row * 4 + h)[2].tolist() for layer in cache.layers for h in range(4)]


def test_rows_with_different_auto_kernels_keep_what_each_keeps_alone():
    """A 40-token and a 600-token prompt in one batch (left padding) are pooled with different
    kernels; each row keeps exactly the tokens it keeps alone, at prefill and after drift refills
    (scored with the per-row kernels) in decoding."""
    model = tiny_model("llama", **TOY_SHAPE)
    L, short = 600, 40
    ids = torch.randint(1, 256, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, : L - short] = 0
    options = dict(budget=0.5, refresh_interval=1, drift_threshold=1.0, pivot_offload=False)

    def cache(**more):
        made = HeteroCache(toy_profile(), **options, **more)
        made.policy._decision_lag = 0  # refills at the check: the rows' refills land in the same steps
        return made

    batch = cache()
    steps = torch.randint(1, 256, (2, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        model(ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, batch))
        kernels = [batch.policy.kernel_for(n) for n in (L, short)]
        assert kernels[0] != kernels[1], kernels  # the case under test
        for t in range(steps.shape[1]):
            m = torch.cat([mask, torch.ones(2, t + 1, dtype=torch.long)], 1)
            model(steps[:, t : t + 1], attention_mask=m, position_ids=positions[:, -1:] + t + 1,
                  **cache_kwarg(model, batch))
    assert batch.stats()["satellite_refills"] > 0
    for row, n in enumerate((L, short)):
        alone = cache()
        with torch.no_grad():
            model(ids[row : row + 1, L - n :], **cache_kwarg(model, alone))
            for t in range(steps.shape[1]):
                model(steps[row : row + 1, t : t + 1], **cache_kwarg(model, alone))
        shift = L - n
        got = [[p - shift for p in seg] for seg in _positions(batch, row)]
        assert got == _positions(alone, 0), row
        # "auto" resolved to an int kernel: the same tokens as that kernel given explicitly
        fixed = cache(kernel=kernels[row])
        with torch.no_grad():
            model(ids[row : row + 1, L - n :], **cache_kwarg(model, fixed))
            for t in range(steps.shape[1]):
                model(steps[row : row + 1, t : t + 1], **cache_kwarg(model, fixed))
        assert _positions(fixed, 0) == _positions(alone, 0), row

"""What every registered method gets tested for, parametrized from the registry (no list to edit):
a method registered in ``heterocache.methods`` — or by ``examples/custom_method.py``, imported
here — runs these on a tiny random model:

- with nothing compressed (budget 1, no eviction while decoding) its tokens are DynamicCache's;
- a left-padded batch gives each row the tokens of that row alone;
- the memory report counts what the cache holds;
- a decode step reads nothing back to the host.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dynamic_reference, tiny_model
from heterocache import list_methods, make_cache
from heterocache._compat import cache_kwarg
from heterocache.bench.diagnostics import count_decode_steps
from heterocache.cli._preflight import import_method_modules
from heterocache.engine.registry import get_method
from heterocache.profile.testing import toy_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_example() -> None:
    """Register the example's method (``keynorm``) as ``--methods-from`` does."""
    import_method_modules([str(Path(__file__).resolve().parents[2] / "examples" / "custom_method.py")])


_load_example()
#: every method on the ragged engine (transformers' own "dynamic" is the oracle, not a subject)
METHODS = [m for m in list_methods() if get_method(m).needs_heterocache_attention]
# The toy profile's shape (HeteroCache needs a profile of the model's shape): 3 layers, 8 query
# heads, 4 KV heads, head_dim 16.
SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def _cache(name: str, budget: float, model, **options):
    """``make_cache`` with what a tiny model needs: a profile for methods that take one."""
    spec = get_method(name)
    if "profile" in spec.params:
        options.setdefault("profile", toy_profile())
    return make_cache(name, budget if spec.uses_budget else None, model, **options)


def test_the_example_method_is_among_them():
    assert "keynorm" in METHODS and len(METHODS) >= 11


@pytest.mark.parametrize("name", METHODS)
def test_nothing_compressed_gives_dynamic_cache_tokens(name):
    model, ids, kw, reference = dynamic_reference(SHAPE, L=90, new_tokens=12)
    options = {"evict_during_decode": False} if "evict_during_decode" in get_method(name).params else {}
    cache = _cache(name, 1.0, model, **options)
    out = model.generate(ids, **cache_kwarg(model, cache), **kw)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", METHODS)
def test_a_padded_batch_gives_each_row_its_own_tokens(name):
    model = tiny_model("llama", **SHAPE)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 256, (1, 70), generator=g), torch.randint(1, 256, (1, 58), generator=g)]
    alone = []
    for ids in rows:
        out = model.generate(ids, **cache_kwarg(model, _cache(name, 0.5, model)), max_new_tokens=6, do_sample=False)
        alone.append(out[0, ids.shape[1]:])
    pad = rows[0].shape[1] - rows[1].shape[1]
    ids = torch.cat([rows[0], torch.cat([torch.zeros(1, pad, dtype=torch.long), rows[1]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, _cache(name, 0.5, model)),
                         max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, ids.shape[1]:], alone[0]) and torch.equal(out[1, ids.shape[1]:], alone[1])


@pytest.mark.parametrize("name", METHODS)
def test_the_memory_report_counts_what_the_cache_holds(name):
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (2, 80), generator=torch.Generator().manual_seed(4))
    cache = _cache(name, 0.4, model)
    model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache), max_new_tokens=5,
                   do_sample=False)
    report = cache.memory_report()
    element = 4 * 2 * SHAPE["head_dim"]  # fp32 keys and values
    stored = sum(int(t.sum()) for t in cache.stored_tokens())
    extra = sum(cache.policy.device_extra_bytes_per_layer().values())
    assert report.device_used_bytes == stored * element  # the stored keys and values
    assert report.device_bytes >= report.device_used_bytes + extra  # + slots, positions, the policy's tensors
    assert report.host_bytes == sum(cache.policy.host_bytes_per_layer().values())
    spec = get_method(name)
    if spec.uses_budget and not spec.selects_per_step:  # a prefill-eviction method keeps less
        assert report.device_used_bytes < report.dynamic_bytes
    assert report.dynamic_bytes == 2 * 4 * SHAPE["num_hidden_layers"] * (80 + 4) * element


@pytest.mark.parametrize("name", METHODS)
def test_a_decode_step_reads_nothing_on_the_host(name):
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    result = count_decode_steps(model, ids, _cache(name, 0.3, model), steps=6)
    assert result["host_reads"] == 0, result["reads_by_kind"]

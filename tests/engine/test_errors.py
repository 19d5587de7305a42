"""Bad input gets a clear error, never a silently wrong answer."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import heterocache
from helpers import tiny_model
from heterocache import AttentionNotEnabledError, FullKVCache, RaggedCache, SnapKVCache
from heterocache._compat import cache_kwarg
from heterocache.methods.snapkv import SnapKVPolicy


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.01, 2, float("nan")])
def test_budget_outside_unit_interval_is_rejected(budget):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        SnapKVCache(budget=budget)


@pytest.mark.parametrize("budget", ["0.5", None, True])
def test_budget_of_wrong_type_is_rejected(budget):
    with pytest.raises(TypeError, match="budget must be a number"):
        SnapKVCache(budget=budget)


def test_ragged_cache_on_model_without_heterocache_attention_raises():
    model = tiny_model("llama", attn="sdpa")
    ids = torch.randint(1, 256, (1, 20))
    with pytest.raises(AttentionNotEnabledError, match="heterocache.enable"):
        model.generate(ids, **cache_kwarg(model, FullKVCache()), max_new_tokens=3, do_sample=False)


def test_single_layer_model_without_heterocache_attention_raises_on_next_step():
    model = tiny_model("llama", attn="sdpa", num_hidden_layers=1)
    ids = torch.randint(1, 256, (1, 20))
    with pytest.raises(AttentionNotEnabledError):
        model.generate(ids, **cache_kwarg(model, SnapKVCache(budget=0.5)), max_new_tokens=3, do_sample=False)


def test_heterocache_attention_with_other_caches_is_exactly_sdpa(arch):
    model = tiny_model(arch, attn="sdpa")
    ids = torch.randint(1, 256, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **cache_kwarg(model, DynamicCache())).logits
        no_cache = model(ids, attention_mask=mask, use_cache=False).logits
        heterocache.enable(model)
        assert model.config._attn_implementation == "heterocache"
        out = model(ids, attention_mask=mask, **cache_kwarg(model, DynamicCache())).logits
        out_no_cache = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(out, ref) and torch.equal(out_no_cache, no_cache)


def test_from_pretrained_accepts_the_attention_name(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="heterocache")
    assert model.config._attn_implementation == "heterocache"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pooling": "median"}, "pooling"),
        ({"window": 0}, "window"),
        ({"kernel": 4}, "kernel"),
        ({"gqa_reduce": "sum"}, "gqa_reduce"),
    ],
)
def test_unsupported_policy_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapKVPolicy(**kwargs)


def test_unknown_cache_option_is_rejected():
    with pytest.raises(TypeError):
        SnapKVCache(budget=0.5, windw=16)


def test_policy_must_be_a_policy_object():
    with pytest.raises(TypeError, match="Policy"):
        RaggedCache(policy="snapkv")


def test_enable_rejects_a_model_that_cannot_switch_attention():
    with pytest.raises(ValueError, match="cannot use the 'heterocache' attention"):
        heterocache.enable(torch.nn.Linear(2, 2))


def test_crop_with_positive_count_is_rejected():
    model = tiny_model("llama")
    cache = FullKVCache()
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 10)), **cache_kwarg(model, cache))
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_the_main_classes_import_from_the_package_root():
    import heterocache
    from heterocache import HeadProfile, HeteroCache, InfeasibleBudgetError, profile_for_model  # noqa: F401

    assert heterocache.HeteroCache.__name__ == "HeteroCache" and heterocache.HeadProfile.__name__ == "HeadProfile"


def test_a_policy_passed_as_the_cache_is_a_clear_error():
    import torch

    from helpers import tiny_model
    from heterocache.methods.snapkv import SnapKVPolicy

    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"policy, not a cache: pass RaggedCache\(SnapKVPolicy"):
        model.generate(torch.randint(1, 200, (1, 20)), **cache_kwarg(model, SnapKVPolicy(budget=0.5)), max_new_tokens=2)

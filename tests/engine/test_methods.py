"""The method registry: every baseline by name, make_cache for the evaluation harness."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import heterocache.engine.registry as methods
from helpers import tiny_model
from heterocache import CAKECache, FullKVCache, H2OCache, PyramidKVCache, SnapKVCache, StreamingLLMCache
from heterocache._compat import cache_kwarg
from heterocache.engine.registry import describe_methods, get_method, list_methods, make_cache, register_method

BASELINES = ["dynamic", "fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "cake"]
CLASSES = {
    "fullkv": FullKVCache,
    "streamingllm": StreamingLLMCache,
    "h2o": H2OCache,
    "snapkv": SnapKVCache,
    "pyramidkv": PyramidKVCache,
    "cake": CAKECache,
}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so tests may register methods."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods


def test_every_baseline_is_listed_with_description_and_parameters():
    names = list_methods()
    assert names[: len(BASELINES)] == BASELINES
    table = describe_methods()
    for name in BASELINES:
        spec = get_method(name)
        assert spec.description and spec.name == name
        assert f"`{name}`" in table
    assert get_method("h2o").params["recent_ratio"] == 0.5
    assert get_method("streamingllm").params["sinks"] == 4
    assert get_method("pyramidkv").params["beta"] == 20.0
    assert get_method("cake").params["gamma"] == 200.0
    assert get_method("snapkv").params["window"] == 32
    assert all("budget_tokens" in get_method(m).params for m in CLASSES if m != "fullkv")


@pytest.mark.parametrize("name", list(CLASSES))
def test_make_cache_builds_the_methods_cache_with_its_budget(name):
    cache = make_cache(name, 0.4)
    assert type(cache) is CLASSES[name]
    if name != "fullkv":
        assert cache.policy.budget == 0.4 and cache.policy.name == name
    assert make_cache(name, 0.4) is not cache  # a fresh cache every call


def test_parameters_and_absolute_budgets_reach_the_policy():
    cache = make_cache("h2o", 0.3, recent_ratio=0.25, evict_during_decode=False, block_size=16)
    assert (cache.policy.recent_ratio, cache.policy.evict_during_decode, cache.block_size) == (0.25, False, 16)
    cache = make_cache("snapkv", None, budget_tokens=512, window=8)
    assert (cache.policy.budget_tokens, cache.policy.window) == (512, 8)


def test_a_method_spec_with_options_reaches_the_policy_and_names_its_records():
    from heterocache.cli._argparse import method_name
    from heterocache.engine.registry import parse_method_spec

    name, params = parse_method_spec("H2O:recent_ratio=0.25:evict_during_decode=false:gqa_reduce=mean")
    assert (name, params) == ("h2o", {"recent_ratio": 0.25, "evict_during_decode": False, "gqa_reduce": "mean"})
    cache = make_cache("h2o:recent_ratio=0.25:evict_during_decode=false:block_size=16", 0.3)
    assert (cache.policy.recent_ratio, cache.policy.evict_during_decode, cache.block_size) == (0.25, False, 16)
    assert make_cache("snapkv:window=8", 0.3, window=4).policy.window == 4  # keyword arguments win
    assert make_cache("snapkv:budget_tokens=none", 0.3).policy.budget_tokens is None
    # the CLI's canonical text reads back to the same options
    text = method_name("H2O:recent_ratio=0.25:evict_during_decode=False")
    assert text == "h2o:recent_ratio=0.25:evict_during_decode=false"
    assert parse_method_spec(text) == ("h2o", {"recent_ratio": 0.25, "evict_during_decode": False})
    with pytest.raises(TypeError, match="no parameter 'windoww'"):
        make_cache("snapkv:windoww=8", 0.3)
    with pytest.raises(ValueError, match="key=value"):
        parse_method_spec("snapkv:window")
    with pytest.raises(ValueError, match="unknown method"):
        parse_method_spec("snapk:window=8")


def test_uncompressed_methods_ignore_the_budget():
    assert type(make_cache("dynamic", 0.1)) is DynamicCache
    assert type(make_cache("fullkv", 0.1)) is FullKVCache
    with pytest.warns(FutureWarning, match="'full' is deprecated; use 'dynamic'"):
        assert type(make_cache("full", None)) is DynamicCache  # the harness's old name for the reference
    model = tiny_model("llama", attn="sdpa")
    assert type(make_cache("dynamic", 1.0, model)) is DynamicCache  # works with any attention
    assert type(make_cache("SnapKV", 0.5)) is SnapKVCache  # case-insensitive


def test_unknown_method_error_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'questt'; known methods: dynamic, fullkv, streamingllm, h2o"):
        make_cache("questt", 0.5)


def test_unknown_parameter_is_rejected_with_the_methods_parameters():
    with pytest.raises(TypeError, match=r"no parameter\(s\) windw; its parameters: budget_tokens, window"):
        make_cache("snapkv", 0.5, windw=8)


@pytest.mark.parametrize("budget,error", [(None, ValueError), (0.0, ValueError), (512, ValueError), ("0.5", TypeError)])
def test_bad_budgets_are_rejected(budget, error):
    with pytest.raises(error, match="budget"):
        make_cache("pyramidkv", budget)


def test_ragged_method_on_a_model_without_heterocache_attention_is_a_clear_error():
    model = tiny_model("llama", attn="sdpa")
    with pytest.raises(ValueError, match=r"heterocache\.enable\(model\)"):
        make_cache("snapkv", 0.5, model)
    assert isinstance(make_cache("dynamic", 0.5, model), DynamicCache)


def test_make_cache_is_the_evaluation_harness_default_factory():
    from heterocache.eval.caches import default_cache_factory, new_cache

    factory = default_cache_factory()
    assert factory is make_cache
    model = tiny_model("qwen2")
    cache = new_cache(factory, "cake", 0.25, model)
    assert isinstance(cache, CAKECache)
    ids = torch.randint(1, 256, (1, 40))
    out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 43)


def test_a_decorated_policy_is_a_method_with_a_generated_cache(registry):
    from dataclasses import dataclass

    from heterocache.policy.scorer import ScorerPolicy

    @register_method("lastkeys", description="a test method", paper="https://example.org/paper")
    @dataclass
    class LastKeysPolicy(ScorerPolicy):
        """Keep the newest tokens (scores rise with the position)."""

        bias: float = 0.0

        def score(self, ctx):
            B, H, L, _ = ctx.key.shape
            return torch.arange(L, dtype=torch.float32).expand(B, H, L) + self.bias

    cache_class = LastKeysPolicy.cache_class
    assert cache_class.__name__ == "LastKeysCache" and cache_class.policy_class is LastKeysPolicy
    spec = get_method("lastkeys")
    assert spec.cache_class is cache_class and spec.paper == "https://example.org/paper"
    assert spec.params["bias"] == 0.0 and "budget_tokens" in spec.params and "block_size" in spec.params
    assert "lastkeys" in list_methods() and "`lastkeys`" in describe_methods()
    cache = make_cache("lastkeys:bias=1.5", 0.5)
    assert type(cache) is cache_class and cache.policy.bias == 1.5 and cache.policy.name == "lastkeys"
    with pytest.raises(TypeError, match="has no parameter"):
        make_cache("lastkeys", 0.5, nope=1)
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 40))
    model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=2, do_sample=False)
    store = cache.layers[0].store
    assert store.lengths().tolist() == [[21, 21]]  # half the prompt, plus the one token fed back
    idx, valid = store.padded_index()
    assert store.pos[idx][valid].view(2, 21)[0].tolist() == list(range(20, 41))  # the newest, by the score
    register_method("lastkeys", description="again")(LastKeysPolicy)  # the same definition run again
    assert get_method("lastkeys").description == "again"

    @dataclass
    class OtherPolicy(ScorerPolicy):
        def score(self, ctx):
            return ctx.key[..., 0]

    with pytest.raises(ValueError, match="registered already"):
        register_method("lastkeys", description="another")(OtherPolicy)


def test_a_factory_can_be_registered(registry):
    @register_method("mine", description="a test method", params={"window": 2})
    def factory(budget, model, **params):
        return SnapKVCache(budget=budget, window=params.get("window", 2))

    assert "mine" in list_methods()
    assert make_cache("mine", 0.5, window=3).policy.window == 3
    register_method("mine", description="again", params={"window": 2}, replace=True)(factory)
    assert get_method("mine").description == "again"
    with pytest.raises(TypeError, match="decorates a Policy subclass or a cache factory"):
        register_method("other", description="x")(DynamicCache)


def test_heterocache_is_registered_and_takes_a_profile_or_finds_the_models():
    from heterocache.methods.heterocache import HeteroCache
    from heterocache.profile import ProfileError
    from heterocache.profile.testing import toy_profile

    assert "heterocache" in list_methods()
    spec = get_method("heterocache")
    assert spec.params["drift_threshold"] == 0.5 and "profile" in spec.params
    model = tiny_model("llama", num_hidden_layers=3, hidden_size=128, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=16)
    cache = make_cache("heterocache", 0.6, model, profile=toy_profile(), refresh_interval=2)
    assert type(cache) is HeteroCache and cache.policy.refresh_interval == 2
    ids = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 64)
    with pytest.raises(ValueError, match="needs the model"):
        make_cache("heterocache", 0.5)
    # a random model has no profile: the error says how to make one
    with pytest.raises(ProfileError, match="profile"):
        make_cache("heterocache", 0.5, model)

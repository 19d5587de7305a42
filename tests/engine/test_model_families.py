"""More model families, each tested like Llama: the uncompressed engine equals DynamicCache + the
model's own SDPA (logits in float64, greedy tokens), every method generates on a left-padded batch,
sliding-window layers keep exactly their window, and what the engine cannot serve is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import heterocache
from heterocache import FullKVCache, UnsupportedArchitectureError, check_architecture
from heterocache._compat import cache_kwarg
from heterocache.engine.registry import list_methods, make_cache
from heterocache.profile.testing import tiny_profile

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 16
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=None)
FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_hidden_layers=2, sliding_window=None)),
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(num_hidden_layers=2, sliding_window=None)),
    # Gemma 3's local layers: sliding window 16 on half the layers, a 60-token prompt.
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    # Every layer sliding (Mistral-7B-v0.1, Phi-3-mini-4k style): served exactly, nothing left to compress.
    "mistral-sliding": (MistralConfig, MistralForCausalLM, dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "phi3-sliding": (Phi3Config, Phi3ForCausalLM, dict(num_hidden_layers=2, sliding_window=WINDOW)),
    # Qwen2's use_sliding_window: layers from max_window_layers on slide.
    "qwen2-sliding": (Qwen2Config, Qwen2ForCausalLM, dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
}


def family_model(name: str, dtype=torch.float32, attn: str = "heterocache"):
    config_cls, model_cls, extra = FAMILIES[name]
    config = config_cls(**{**SHAPE, **extra})
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config).to(dtype).eval()
    model.config.name_or_path = f"tiny/{name}"
    return model


def padded_batch(length: int, pad: int = 11, seed: int = 0):
    ids = torch.randint(1, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0  # row 1 is left-padded
    return ids, mask


def generate(model, ids, mask, cache, attn, steps):
    model.set_attn_implementation(attn)
    return model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=steps,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)


def sliding_layers(model) -> dict[int, int]:
    spec = check_architecture(model.config)
    return {i: w for i, w in enumerate(spec.sliding_windows) if w is not None}


# ----------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("length, steps", [(60, 8), (10, 12)])  # prompt past the window; decoding across it
def test_fullkv_logits_equal_dynamic_cache_in_float64(name, length, steps):
    model = family_model(name, torch.float64)
    ids, mask = padded_batch(length, pad=3 if length < 20 else 11)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), "sdpa", steps)
    cache = FullKVCache()
    out = generate(model, ids, mask, cache, "heterocache", steps)
    assert torch.equal(out.sequences, ref.sequences)
    for ours, theirs in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    seen = ids.shape[1] + steps - 1
    real = mask.sum(-1) + steps - 1
    for i, layer in enumerate(cache.layers):
        stored = layer.store.lengths_host()
        if i in sliding_layers(model):  # exactly its window: the W - 1 newest real tokens
            expected = torch.clamp(real, max=WINDOW - 1)
            assert layer.sliding_window == WINDOW and layer.policy_idx is None
        else:
            expected = real
        assert layer.seen == seen
        assert (stored == expected.numpy()[:, None]).all(), (i, stored)


@pytest.mark.parametrize("name", ["gemma3", "qwen2-sliding"])
def test_a_second_turn_past_the_window_equals_dynamic_cache(name):
    model = family_model(name, torch.float64)
    ids, mask = padded_batch(30)
    more = torch.randint(1, 256, (2, 2 * WINDOW + 3), generator=torch.Generator().manual_seed(5))

    def two_turns(cache, attn):
        first = generate(model, ids, mask, cache, attn, 5).sequences
        ids2 = torch.cat([first, more], dim=1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        return generate(model, ids2, mask2, cache, attn, 6)

    ref, out = two_turns(DynamicCache(config=model.config), "sdpa"), two_turns(FullKVCache(), "heterocache")
    assert torch.equal(out.sequences, ref.sequences)
    for ours, theirs in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- every method
def _cache(method: str, model):
    params = {}
    if method == "heterocache":
        c = model.config
        params["profile"] = tiny_profile(c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads, 16)
    return make_cache(method, 0.75, model, **params)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_generates_on_a_left_padded_batch(name):
    model = family_model(name)
    ids, mask = padded_batch(60)
    windows = sliding_layers(model)
    for method in list_methods():
        cache = _cache(method, model)
        out = generate(model, ids, mask, cache, "heterocache", 10)
        assert out.sequences.shape == (2, 70), method
        if method == "dynamic":
            continue
        for i, layer in enumerate(cache.layers):
            stored = layer.store.lengths_host()
            if i in windows:  # never more than the window, and exactly it (left padding is not stored)
                assert (stored == min(WINDOW - 1, 60 - 11 + 9)).all() and stored.max() <= WINDOW - 1, (method, i)
            else:
                assert (stored >= 1).all() and (stored[1] <= stored[0].max()).all(), (method, i)
        report = cache.memory_report()
        assert {role for layer in report.layers for role in layer.roles} >= ({"sliding"} if windows else set())


def test_the_budget_counts_only_the_full_layers():
    model = family_model("gemma3")
    ids = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    cache = make_cache("snapkv", 0.5, model)
    generate(model, ids, torch.ones_like(ids), cache, "heterocache", 1)
    cache.end_prompt()  # one new token: no decode step ended the prompt
    stored = {i: int(layer.store.lengths_host().max()) for i, layer in enumerate(cache.layers)}
    assert stored == {0: WINDOW - 1, 1: 30, 2: WINDOW - 1, 3: 30}
    cache = make_cache("pyramidkv", 0.5, model, window=4)  # the schedule spans the 2 full layers
    generate(model, ids, torch.ones_like(ids), cache, "heterocache", 1)
    cache.end_prompt()
    full = [int(cache.layers[i].store.lengths_host().sum()) for i in (1, 3)]
    assert sum(full) == 2 * 2 * 30 and full[0] > full[1]


# ----------------------------------------------------------------------------- refused
def _refused(config_cls, match, **kwargs):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        check_architecture(config_cls(**kwargs))


def test_configs_the_engine_cannot_serve_are_refused_with_the_reason():
    from transformers import (
        DeepseekV3Config,
        FalconH1Config,
        Gemma2Config,
        GptOssConfig,
        JambaConfig,
        Llama4TextConfig,
        MambaConfig,
        Qwen3NextConfig,
    )

    _refused(Gemma2Config, "Gemma2.*softcapped attention logits")
    _refused(DeepseekV3Config, "multi-head latent attention")
    _refused(Qwen3NextConfig, "linear-attention")
    _refused(MambaConfig, "state-space")
    _refused(JambaConfig, "state-space")
    _refused(FalconH1Config, "state-space")
    _refused(GptOssConfig, "attention sinks")
    _refused(Llama4TextConfig, "chunked_attention", attention_chunk_size=64, layer_types=None)
    _refused(Gemma3TextConfig, "bidirectional", use_bidirectional_attention=True)
    unknown = Gemma3TextConfig(num_hidden_layers=2)
    unknown.layer_types = ["sliding_attention", "linear_attention"]  # 5.17 cannot build it
    with pytest.raises(UnsupportedArchitectureError, match=r"'linear_attention' \(layers 1\)"):
        check_architecture(unknown)
    _refused(Gemma3TextConfig, "sliding_window >= 2", sliding_window=1)
    # the error is both kinds a caller may catch
    assert issubclass(UnsupportedArchitectureError, ValueError)
    assert issubclass(UnsupportedArchitectureError, NotImplementedError)


def test_unsupported_models_are_refused_before_anything_runs():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**{**SHAPE, "num_hidden_layers": 2, "sliding_window": WINDOW})
    config._attn_implementation = "eager"  # Gemma 2 has no sdpa (softcapping)
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(1, 256, (1, 8))
    with pytest.raises(UnsupportedArchitectureError, match="softcap"):
        heterocache.enable(model)
    with pytest.raises(UnsupportedArchitectureError, match="softcap"):
        make_cache("snapkv", 0.5, model)
    # loaded with the heterocache attention: the first forward's mask refuses it
    config._attn_implementation = "heterocache"
    with pytest.raises(UnsupportedArchitectureError, match="softcap"), torch.no_grad():
        model(ids, **cache_kwarg(model, FullKVCache()))


def test_attention_calls_asking_for_what_we_do_not_compute_are_refused():
    from heterocache.engine.architectures import check_attention_call

    module = torch.nn.Module()
    k = torch.zeros(1, 2, 3, 16)
    for kwargs, match in [({"softcap": 50.0}, "softcap"), ({"s_aux": torch.zeros(4)}, "sinks"),
                          ({"position_bias": torch.zeros(1)}, "position bias"), ({"is_causal": False}, "non-causal")]:
        with pytest.raises(UnsupportedArchitectureError, match=match):
            check_attention_call(module, k, k, kwargs)
    with pytest.raises(UnsupportedArchitectureError, match="different head sizes"):
        check_attention_call(module, k, torch.zeros(1, 2, 3, 8), {})
    spec = check_architecture(family_model("gemma3").config)
    module.layer_idx = 1  # a full layer
    with pytest.raises(UnsupportedArchitectureError, match="sliding_window=8"):
        check_attention_call(module, k, k, {"sliding_window": 8}, spec)
    module.layer_idx = 0
    check_attention_call(module, k, k, {"sliding_window": WINDOW}, spec)


def test_what_a_sliding_layer_cannot_do_is_refused():
    model = family_model("gemma3")
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 30] = 0  # padding inside the window
    padded = FullKVCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, padded))
    with pytest.raises(NotImplementedError, match="only left padding"):
        padded.end_prompt()  # where the sliding layers are filled (docs/prefill.md)
    cache = FullKVCache()
    with torch.no_grad():
        model(ids, **cache_kwarg(model, cache))
    with pytest.raises(NotImplementedError, match="crop cannot restore"):
        cache.crop(-2)


# ----------------------------------------------------------------------------- the decode step
def test_sliding_layers_add_no_host_read_to_the_decode_step_and_the_device_path_is_exact(monkeypatch):
    from heterocache.bench.diagnostics import count_decode_steps

    model = family_model("gemma3", torch.float64)
    ids = torch.randint(1, 256, (2, 60), generator=torch.Generator().manual_seed(6))
    model.set_attn_implementation("sdpa")
    dynamic = count_decode_steps(model, ids, DynamicCache(config=model.config), steps=6)
    for strategy in ("device", "segments"):
        monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
        model.set_attn_implementation("heterocache")
        for method in ("fullkv", "streamingllm"):
            result = count_decode_steps(model, ids, make_cache(method, 0.5, model), steps=6)
            assert result["host_reads"] <= dynamic["host_reads"] + 1, (strategy, method, result["reads_by_kind"])
        ref = generate(model, ids, torch.ones_like(ids), DynamicCache(config=model.config), "sdpa", 20)
        out = generate(model, ids, torch.ones_like(ids), FullKVCache(), "heterocache", 20)
        assert torch.equal(out.sequences, ref.sequences)
        tol = 1e-9 if strategy == "segments" else 1e-5  # the block-wise stand-in accumulates in float32
        for ours, theirs in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_a_shared_prefill_fills_sliding_layers_like_their_own_prefill():
    from heterocache.eval.shared_prefill import PrefillTarget, greedy_continue, prefill_many

    model = family_model("gemma3", torch.float64)
    ids = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(7))
    ref = generate(model, ids, torch.ones_like(ids), DynamicCache(config=model.config), "sdpa", 8).sequences[0, 60:]
    model.set_attn_implementation("heterocache")
    whole, context = FullKVCache(), make_cache("snapkv", 0.5, model)
    logits = prefill_many(model, ids, [PrefillTarget(whole, 60), PrefillTarget(context, 40)])
    assert greedy_continue(model, whole, 8, set(), logits=logits) == ref.tolist()
    assert [int(layer.store.lengths_host().max()) for layer in context.layers] == [WINDOW - 1, 20, WINDOW - 1, 20]
    own = make_cache("snapkv", 0.5, model)
    with torch.no_grad():
        model(ids[:, :40], **cache_kwarg(model, own))
    own.end_prompt()
    for shared, alone in zip(context.layers, own.layers, strict=True):
        (k1, _, _, pos1), (k2, _, _, pos2) = shared.store.padded(), alone.store.padded()
        assert torch.equal(pos1, pos2)
        torch.testing.assert_close(k1, k2, rtol=1e-9, atol=1e-9)
    new = greedy_continue(model, context, 8, set(), new_ids=ids[:, 40:])
    assert len(new) == 8


# ----------------------------------------------------------------------------- a prompt in pieces
@pytest.mark.parametrize("name", ["gemma3", "mistral-sliding"])
@pytest.mark.parametrize("method", ["fullkv", "snapkv"])
def test_a_chunked_prefill_fills_sliding_layers_like_one_piece(name, method):
    """Sliding layers keep their window across pieces (padding longer than a piece included);
    FullKV gives DynamicCache's tokens, SnapKV the one-piece cache (docs/prefill.md)."""
    model = family_model(name, torch.float64)
    ids, mask = padded_batch(60, pad=20)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), "sdpa", 8).sequences
    results = {}
    model.set_attn_implementation("heterocache")
    for chunk in (None, 6, 16):
        cache = make_cache(method, 0.5, model)
        out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=8,
                             do_sample=False, prefill_chunk_size=chunk)
        stores = [layer.store.padded() for layer in cache.layers]
        results[chunk] = (out.tolist(), [(k.tolist(), pos.tolist()) for k, _, _, pos in stores])
    assert results[6] == results[None] and results[16] == results[None]
    if method == "fullkv":
        assert results[None][0] == ref.tolist()
